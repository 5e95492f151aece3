#!/bin/bash
# Fine-tuning methods compared on the same synthetic potassium shards, from the same pretrained backbone
# (docs/finetune-methods.md). Run from an empty folder: bash path/to/recipes/finetune/compare-methods.sh
set -u
E=${ECGFM:-ecgfm}
BASE=$(cd "$(dirname "$0")/../.." && pwd)/checkpoints/ludb-diagnoses-net1d-small/model.safetensors
$E synth --out shards --n_segments 384 --segments_per_patient 4 --progress false
common="--config potassium/net1d-small --data.root shards --trainer.max_epochs 3 --trainer.enable_progress_bar false --model.pretrained $BASE --data.batch_size 32"
run() { name=$1; shift; start=$(date +%s); $E fit $common --trainer.default_root_dir runs/$name --trainer.logger.init_args.save_dir runs/$name/logs "$@" > logs-$name.txt 2>&1; echo "$name rc=$? seconds=$(( $(date +%s) - start ))" >> times.txt; }
run full
run linear_probe --model.finetune linear_probe
run lp_ft --model.finetune lp_ft --model.lp_epochs 1
run llrd --model.layer_decay 0.7 --model.warmup_steps 0.1
run lora '--model.peft={method: lora, r: 4, alpha: 8}'
start=$(date +%s); $E embed --model ludb-diagnoses-net1d-small --data shards --out features > logs-embed.txt 2>&1; echo "embed rc=$? seconds=$(( $(date +%s) - start ))" >> times.txt
run embed_probe --model.backbone precomputed --model.backbone_kwargs "{features_from: features}" --model.pretrained null --data.root features
# the last validation of each run, per segment as the loop logs it
PY=${PYTHON:-python3}
$PY - <<'PYEOF'
import csv, glob
keys = ["val/loss", "val/segment/potassium/mae", "val/segment/potassium/pearson", "val/segment/potassium/auroc/hyperkalemia"]
print("| method | " + " | ".join(keys) + " |")
for name in ["full", "linear_probe", "lp_ft", "llrd", "lora", "embed_probe"]:
    found = sorted(glob.glob(f"runs/{name}/logs/*/version_*/metrics.csv"))
    last = {}
    for row in csv.DictReader(open(found[-1])) if found else []:
        last.update({k: v for k, v in row.items() if v})
    print(f"| {name} | " + " | ".join(f"{float(last[k]):.3f}" if k in last else "-" for k in keys) + " |")
PYEOF
