"""What every run needs, whatever the benchmark: config resolvers, the shared MoE LightningModule base,
run folders (lock, done, attempts), config checks, resume checks, checkpoint IO, samplers, loggers."""
