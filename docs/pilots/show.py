"""Print pilot runs' records. DomainBed (a results.jsonl): per evaluation, the test domain's in/out accuracy and the
training domains' mean out accuracy (training-domain validation reads the latter). GLUE (no results.jsonl): per
epoch, the dev score and the held-out score from summary.json. Usage: python docs/pilots/show.py [--step N] <run> ...
(several DomainBed runs: the mean test accuracy over them at their last evaluation, or at DomainBed step N)."""

import json
import os
import sys

args = sys.argv[1:]
at = None
if args[:1] == ["--step"]:
    at, args = int(args[1]), args[2:]
domainbed = []
for d in args:
    s = json.load(open(f"{d}/summary.json"))
    print(f"{d}: wall_time_s {s.get('wall_time_s')}")
    if not os.path.isfile(f"{d}/results.jsonl"):
        for e in s["epochs"]:
            held = (e.get("heldout") or {}).get("score")
            print(f"  epoch {e['epoch']} (update {e['step']}): dev {100 * e['dev']['score']:.1f}"
                  + ("" if held is None else f"; held-out {100 * held:.1f}"))
        continue
    for line in open(f"{d}/results.jsonl"):
        r = json.loads(line)
        test = r["args"]["test_envs"][0]
        envs = sorted(int(k[3:-7]) for k in r if k.startswith("env") and k.endswith("_in_acc"))
        outs = [r[f"env{i}_out_acc"] for i in envs if i != test]
        print(f"  step {r['step']:>4}: test env{test} in {100 * r[f'env{test}_in_acc']:.1f} out "
              f"{100 * r[f'env{test}_out_acc']:.1f}; training domains' out mean {100 * sum(outs) / len(outs):.1f}")
    domainbed.append(d)

if len(domainbed) > 1:  # several DomainBed runs: the mean test accuracy at each run's last (or step N) evaluation
    last = []
    for d in domainbed:
        rs = [json.loads(line) for line in open(f"{d}/results.jsonl")]
        r = rs[-1] if at is None else next(r for r in rs if r["step"] == at)
        last.append(r[f"env{r['args']['test_envs'][0]}_in_acc"])
    where = "the last step" if at is None else f"step {at}"
    print(f"mean test accuracy at {where} over {len(last)} test domains: {100 * sum(last) / len(last):.1f}")
