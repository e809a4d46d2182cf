"""Print a pilot run's DomainBed records: per evaluation, the test domain's in/out accuracy and the training
domains' mean out accuracy (training-domain validation reads the latter). Usage: python docs/pilots/show.py <run> ..."""

import json, sys
for d in sys.argv[1:]:
    s = json.load(open(f"{d}/summary.json"))
    print(f"{d}: wall_time_s {s.get('wall_time_s')}")
    for line in open(f"{d}/results.jsonl"):
        r = json.loads(line)
        test = r["args"]["test_envs"][0]
        train = [i for i in range(6) if i != test]
        outs = [r[f"env{i}_out_acc"] for i in train]
        print(f"  step {r['step']:>4}: test env{test} in {100 * r[f'env{test}_in_acc']:.1f} out "
              f"{100 * r[f'env{test}_out_acc']:.1f}; training domains' out mean {100 * sum(outs) / len(outs):.1f}")

if len(sys.argv) > 2:  # several runs: the mean test accuracy at each run's last evaluation
    last = []
    for d in sys.argv[1:]:
        r = [json.loads(line) for line in open(f"{d}/results.jsonl")][-1]
        last.append(r[f"env{r['args']['test_envs'][0]}_in_acc"])
    print(f"mean test accuracy at the last step over {len(last)} test domains: {100 * sum(last) / len(last):.1f}")
