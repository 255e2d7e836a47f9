#!/usr/bin/env bash
# A real two-node Ray cluster on localhost (a head node and a second node, 1 CPU each), the sensitivity
# sweep of benchmarks/ray_sweep.py joined to it with --address, and one worker process killed by PID
# mid-run: the sweep must complete (Ray retries the killed task) with rows identical to the serial run's.
#
#   python benchmarks/ray_sweep.py --model resnet56 --eval-images 1000 --json runs/ray_sweep.json   # reference
#   benchmarks/ray_two_nodes.sh resnet56 1000 runs/ray_sweep.json
#
# Arguments after the third go to ray_sweep.py (e.g. --calib-images 64: the same as the reference run's).
#
# Stops the cluster (ray stop) on exit, also on failure.
set -euo pipefail
model=${1:-resnet20}; images=${2:-200}; reference=${3:-runs/ray_sweep_r20.json}
port=${RAY_PORT:-6390}
cd "$(dirname "$0")/.."
# the head enables token authentication (Ray 2.5x+): the second node and the driver must use it too
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 RAY_AUTH_MODE=token
out=runs/ray_two_nodes; mkdir -p "$out"; rm -f "$out/tasks.jsonl"
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --port "$port" --num-cpus 1 --disable-usage-stats >"$out/head.log" 2>&1
ray start --address "127.0.0.1:$port" --num-cpus 1 --disable-usage-stats >"$out/node2.log" 2>&1
python - "$port" <<'PY'
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR")
print(f"cluster: {len([n for n in ray.nodes() if n['Alive']])} alive nodes, {ray.cluster_resources().get('CPU')} CPUs")
ray.shutdown()
PY
start=$(date +%s.%N)
python benchmarks/ray_sweep.py --model "$model" --eval-images "$images" --address "127.0.0.1:$port" --skip-serial \
    --compare-to "$reference" --checkpoint "$out/tasks.jsonl" --json "$out/result.json" "${@:4}" >"$out/sweep.log" 2>&1 &
sweep=$!
# once a few measurements are checkpointed, kill one worker that is executing a task
until [ "$(wc -l 2>/dev/null <"$out/tasks.jsonl" || echo 0)" -ge 5 ]; do sleep 1; kill -0 $sweep; done
victim=$(pgrep -f 'ray::_execute' | head -1)
echo "killing Ray worker PID $victim (running $(ps -o args= -p "$victim")) after $(wc -l <"$out/tasks.jsonl") tasks"
kill -9 "$victim"
wait $sweep
echo "sweep finished in $(echo "$(date +%s.%N) - $start" | bc) s"
grep -E "ray,|identical|checkpoint" "$out/sweep.log" | sed 's/.*\r//'
# driver restart: kill the driver (kill -9, no clean-up) mid-sweep, start it again on the same checkpoint
rm -f "$out/restart.jsonl"
python benchmarks/ray_sweep.py --model "$model" --eval-images "$images" --address "127.0.0.1:$port" --skip-serial \
    --compare-to "$reference" --checkpoint "$out/restart.jsonl" "${@:4}" >"$out/driver1.log" 2>&1 &
driver=$!
until [ "$(wc -l 2>/dev/null <"$out/restart.jsonl" || echo 0)" -ge 10 ]; do sleep 1; kill -0 $driver; done
kill -9 "$driver"; wait "$driver" 2>/dev/null || true
echo "driver PID $driver killed after $(wc -l <"$out/restart.jsonl") checkpointed measurements; restarting it"
python benchmarks/ray_sweep.py --model "$model" --eval-images "$images" --address "127.0.0.1:$port" --skip-serial \
    --compare-to "$reference" --checkpoint "$out/restart.jsonl" --json "$out/restart.json" "${@:4}" >"$out/driver2.log" 2>&1
grep -E "ray,|identical|checkpoint" "$out/driver2.log" | sed 's/.*\r//'
echo "measurements in the checkpoint: $(wc -l <"$out/restart.jsonl") (each done once)"
