"""ByteTrack's cost per frame vs the number of active tracks (seed 003's tracker profile, redone).

SYNTHETIC scenes, no detector: N objects (N = 1 … 200) move at constant random velocities in a
1280×720 frame, bouncing off the edges; each frame gives noisy detections of them (Gaussian box
noise σ = 2 px; 75 % high scores 0.6–1.0, 20 % low scores 0.15–0.45 so BYTE's second association
has work, 5 % missed) plus 5 % false positives. After `--warmup` frames (the tracks established)
`--frames` frames are timed with `time.perf_counter` inside `ByteTracker.update`; medians per
stage: Kalman predict, first association (IoU + score fusion + assignment), second association,
Kalman update (+ new-track initiation), total. Association = first + second association.

Targets (issue 17): association ≤ 1 ms/frame at 50 tracks and ≤ 3 ms at 200; Kalman
predict + update ≤ 0.5 ms at 200 tracks. The CPU, load average and assignment backend are printed:
numbers taken while other jobs load the machine are not trustworthy.

    python benchmarks/tracker_profile.py --out runs/tracker_profile        # table, JSON and PNG
    python benchmarks/tracker_profile.py --tracks 1 50 200 --frames 20     # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path

import numpy as np

from qdet.bench.machine import cpu_info, load_average
from qdet.track import ByteTrackConfig, ByteTracker, assignment_backend

W, H = 1280, 720
DEFAULT_TRACKS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200)
TARGETS = {50: {"association_ms": 1.0}, 200: {"association_ms": 3.0, "kalman_ms": 0.5}}


class Scene:
    """N SYNTHETIC objects with constant velocities; `detections()` advances one frame."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.wh = np.column_stack([rng.uniform(20, 80, n), rng.uniform(50, 200, n)])
        self.xy = np.column_stack([rng.uniform(0, W - 80, n), rng.uniform(0, H - 200, n)])
        self.v = rng.uniform(-3, 3, (n, 2))

    def detections(self) -> tuple[np.ndarray, np.ndarray]:
        self.xy += self.v
        hi = np.array([W, H]) - self.wh
        bounce = (self.xy < 0) | (self.xy > hi)
        self.v[bounce] *= -1
        self.xy = np.clip(self.xy, 0, hi)
        n, rng = len(self.xy), self.rng
        boxes = np.concatenate([self.xy, self.xy + self.wh], axis=1) + rng.normal(0, 2.0, (n, 4))
        u = rng.uniform(size=n)
        scores = np.where(u < 0.75, rng.uniform(0.6, 1.0, n), rng.uniform(0.15, 0.45, n))
        seen = u < 0.95  # the last 5 %: missed this frame
        n_fp = rng.binomial(n, 0.05)
        fp_xy = rng.uniform(0, [W - 60, H - 150], (n_fp, 2))
        fp = np.concatenate([fp_xy, fp_xy + rng.uniform([20, 50], [60, 150], (n_fp, 2))], axis=1)
        return np.concatenate([boxes[seen], fp]), np.concatenate([scores[seen], rng.uniform(0.1, 0.6, n_fp)])


def profile(n: int, *, frames: int, warmup: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng([seed, n])
    scene = Scene(n, rng)
    tracker = ByteTracker(ByteTrackConfig())
    per_frame: dict[str, list[float]] = {k: [] for k in ("predict", "first", "second", "update", "total", "active")}
    for f in range(warmup + frames):
        boxes, scores = scene.detections()
        tracker.update(boxes, scores)
        if f < warmup:
            continue
        t = tracker.timings
        per_frame["predict"].append(t["predict"])
        per_frame["first"].append(t["first_association"])
        per_frame["second"].append(t["second_association"])
        per_frame["update"].append(t["kalman_update"])
        per_frame["total"].append(t["total"])
        per_frame["active"].append(tracker.active_tracks)
    ms = {k: 1000 * float(np.median(v)) for k, v in per_frame.items() if k != "active"}
    # stage timers include the batched Kalman update of the matched pairs; report it separately
    first_second = np.array(per_frame["first"]) + np.array(per_frame["second"])
    assoc = first_second - np.array(per_frame["update"])
    return {
        "objects": n, "active_tracks": float(np.median(per_frame["active"])),
        "predict_ms": ms["predict"], "first_association_ms": ms["first"], "second_association_ms": ms["second"],
        "kalman_update_ms": ms["update"], "association_ms": 1000 * float(np.median(assoc)),
        "kalman_ms": 1000 * float(np.median(np.array(per_frame["predict"]) + np.array(per_frame["update"]))),
        "total_ms": ms["total"], "p90_total_ms": 1000 * float(np.percentile(per_frame["total"], 90)),
    }


def plot(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["active_tracks"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, label in (("predict_ms", "Kalman predict"), ("kalman_update_ms", "Kalman update (+ new tracks)"),
                       ("first_association_ms", "first association (incl. its update)"),
                       ("second_association_ms", "second association (incl. its update)"),
                       ("association_ms", "association (1st + 2nd, no Kalman)"), ("total_ms", "total")):
        ax.plot(x, [r[key] for r in rows], marker="o", ms=3, label=label, lw=2.2 if key == "total_ms" else 1.4)
    ax.scatter([50, 200], [1.0, 3.0], marker="x", color="k", zorder=5, label="association targets")
    ax.set_xlabel("active tracks (tracked + lost)")
    ax.set_ylabel("ms per frame (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracks", type=int, nargs="+", default=list(DEFAULT_TRACKS), help="objects per scene")
    ap.add_argument("--frames", type=int, default=300, help="timed frames per scene (default: 300)")
    ap.add_argument("--warmup", type=int, default=30, help="untimed frames first (default: 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/tracker_profile"), help="folder for JSON + PNG")
    args = ap.parse_args()
    cpu = cpu_info()
    load_start = load_average()
    rows = [profile(n, frames=args.frames, warmup=args.warmup, seed=args.seed) for n in args.tracks]
    head = (f"ByteTrack per-frame cost, SYNTHETIC tracks with noisy detections · {cpu.model} · assignment: "
            f"{assignment_backend()} · numpy {np.__version__} · OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
            f" · load {load_start} → {load_average()} · {args.frames} frames per point, medians")
    print(head)
    cols = ["objects", "active_tracks", "predict_ms", "first_association_ms", "second_association_ms",
            "kalman_update_ms", "association_ms", "kalman_ms", "total_ms", "p90_total_ms"]
    print("  ".join(f"{c:>21s}" if i > 1 else f"{c:>13s}" for i, c in enumerate(cols)))
    for r in rows:
        print("  ".join(f"{r[c]:>21.3f}" if i > 1 else f"{r[c]:>13.0f}" for i, c in enumerate(cols)))
    for n, targets in TARGETS.items():
        row = next((r for r in rows if r["objects"] == n), None)
        if row is None:
            continue
        for key, limit in targets.items():
            verdict = "meets" if row[key] <= limit else "MISSES"
            print(f"target at {n} objects ({row['active_tracks']:.0f} active tracks): {key} {row[key]:.3f} ms "
                  f"{verdict} <= {limit} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracker_profile.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    png = plot(rows, args.out / "tracker_profile.png", textwrap.fill(head, 120))
    print(f"written: {args.out / 'tracker_profile.json'}, {png}")


if __name__ == "__main__":
    main()
