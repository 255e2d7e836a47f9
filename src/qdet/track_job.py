"""`qdet track MODEL --sequences DIR`: ByteTrack with the float and the int8 detector, side by side.

One run quantizes the detector (calibrated on its own training images, as `qdet quantize` does),
lowers float and int8 to the same runtime, tracks every sequence with both — interleaved sequence
by sequence, so machine load hits both alike — and prints MOTA, IDF1, HOTA, ID switches, end-to-end
FPS and tracker ms/frame per detector, with the int8 − float differences. Results are written in
MOTChallenge format under `--out-dir`; `--video` draws the track ids (float left, int8 right).

    qdet track yolov5n --sequences runs/synthcam --synthesize 8     # build 8 SYNTHETIC sequences first
    qdet track yolov5n --sequences MOT17/train --json track.json --video track.mp4
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qdet.errors import ConfigError, DataError
from qdet.track.byte import ByteTrackConfig

__all__ = ["TrackOptions", "add_track_parser", "cmd_track", "draw_tracks", "track_job"]


@dataclass(frozen=True)
class TrackOptions:
    sequences: str
    runtime: str = "openvino"
    threads: int = 2
    calib_images: int = 512
    calib_batch: int = 32
    seed: int = 0
    img_size: int = 640
    max_frames: int | None = None  # per sequence
    min_visibility: float = 0.0
    tracker: ByteTrackConfig = field(default_factory=ByteTrackConfig)
    out_dir: str | None = None
    video: str | None = None
    video_sequence: str | None = None
    video_frames: int = 90
    video_fps: float = 10.0
    progress: bool = True


def frame_detector(adapter: Any, model: Callable[..., Any], img_size: int) -> Callable[[np.ndarray], Any]:
    """The adapter's frame → (boxes, scores) detector for the tracked class (YOLO: COCO person)."""
    from qdet.models.yolo.adapter import YoloAdapter

    if hasattr(adapter, "frame_detector"):
        return adapter.frame_detector(model, img_size=img_size)
    if isinstance(adapter, YoloAdapter):
        from qdet.models.yolo.track import YoloFrameDetector

        return YoloFrameDetector(model, img_size=img_size)
    raise ConfigError(f"model {adapter.name!r} has no tracking detector; `qdet track` supports the YOLOv5 models")


def _slug(label: str) -> str:
    """"int8 (openvino)" → "int8_openvino": a folder name."""
    return "_".join("".join(c if c.isalnum() else " " for c in label).split())


def load_sequences(folder: str | Path) -> list[Any]:
    """The sequences under `folder`, every frame checked and ground truth present (one-line errors)."""
    from qdet.data.mot import check_frames, read_sequences

    seqs = read_sequences(folder)
    for s in seqs:
        check_frames(s)
        if s.gt is None:
            raise DataError(f"{s.root}: no gt/gt.txt; `qdet track` evaluates against ground truth")
    return seqs


def track_job(adapter: Any, model: Any, cfg: Any, opts: TrackOptions) -> Any:
    """Quantize, lower float + int8 to `opts.runtime`, track every sequence with both, evaluate."""
    import torch
    from tqdm import tqdm

    from qdet import api
    from qdet.bench.latency import torch_threads
    from qdet.data.coco import load_image
    from qdet.data.mot import write_results
    from qdet.eval.mot import evaluate_mot
    from qdet.jobs import JobOptions, JobResult, calibration_loader, lower_float
    from qdet.track.run import track_sequence

    seqs = load_sequences(opts.sequences)
    if opts.video_sequence is not None and opts.video_sequence not in {s.name for s in seqs}:
        raise ConfigError(f"--video-sequence {opts.video_sequence!r} is not one of: {', '.join(s.name for s in seqs)}")
    torch.manual_seed(opts.seed)
    jopts = JobOptions(calib_images=opts.calib_images, calib_batch=opts.calib_batch, seed=opts.seed,
                       runtime=opts.runtime, threads=opts.threads, progress=opts.progress)
    with torch_threads(opts.threads):
        qmodel = api.quantize(model, calibration_loader(adapter, jopts), cfg, adapter=adapter, progress=opts.progress)
        lowered = {f"float ({opts.runtime})": lower_float(adapter, model, qmodel, opts.runtime, threads=opts.threads),
                   f"int8 ({opts.runtime})": api.lower(qmodel, opts.runtime, threads=opts.threads)}
    labels = list(lowered)
    detectors = {k: frame_detector(adapter, m, opts.img_size) for k, m in lowered.items()}
    video_seq = opts.video_sequence or seqs[0].name
    runs: dict[str, dict[str, Any]] = {k: {} for k in labels}
    with torch_threads(opts.threads), torch.no_grad():
        for s in seqs:  # warm-up: compile each runtime for each frame size before any timing
            for det in detectors.values():
                det(load_image(s.frame_path(1)))
        for i, s in enumerate(tqdm(seqs, desc="tracking float and int8 (sequences)", disable=not opts.progress)):
            order = labels if i % 2 == 0 else labels[::-1]  # alternate who goes first
            for label in order:
                runs[label][s.name] = track_sequence(
                    detectors[label], s, opts.tracker, max_frames=opts.max_frames,
                    keep_tracks=opts.video is not None and s.name == video_seq,
                    progress=opts.progress, desc=f"{label} {s.name} (frames)")
    out_dir = Path(opts.out_dir or f"runs/track/{adapter.name}")
    rows, per_seq = [], {}
    for label in labels:
        for s in seqs:
            r = runs[label][s.name]
            write_results(out_dir / _slug(label) / f"{s.name}.txt",
                          [tuple(x) for x in r.rows.tolist()])  # type: ignore[misc]
        n_frames = {s.name: runs[label][s.name].frames for s in seqs}
        pairs = {s.name: (s.gt[s.gt[:, 0] <= n_frames[s.name]], runs[label][s.name].rows) for s in seqs}  # type: ignore[index]
        ev = evaluate_mot(pairs, min_visibility=opts.min_visibility)
        secs = {k: sum(r.seconds[k] for r in runs[label].values()) for k in ("read", "detect", "track")}
        frames = sum(r.frames for r in runs[label].values())
        o = ev.overall
        rows.append({"model": label, "runtime": opts.runtime, "mota_pct": o["mota_pct"], "idf1_pct": o["idf1_pct"],
                     "hota_pct": o["hota_pct"], "id_switches": o["id_switches"], "fp": o["fp"], "fn": o["fn"],
                     "fps": frames / sum(secs.values()), "detector_ms": 1000 * secs["detect"] / frames,
                     "tracker_ms": 1000 * secs["track"] / frames, "frames": frames})
        per_seq[label] = ev.sequences
        hota_note = ev.hota_note
    base = rows[0]
    for r in rows:
        for k in ("mota_pct", "idf1_pct", "hota_pct"):
            r[f"d_{k}"] = None if r[k] is None or base[k] is None else r[k] - base[k]
        r["fps_ratio"] = r["fps"] / base["fps"]
    notes = [f"{len(seqs)} sequences, {rows[0]['frames']} frames each detector; results in {out_dir}"]
    if any("synthcam" in s.name for s in seqs):
        from qdet.data.mot_synth import SYNTHETIC_NOTE

        notes.append(SYNTHETIC_NOTE)
    if hota_note:
        notes.append(hota_note)
    if opts.video is not None:
        path = write_track_video({k: runs[k][video_seq] for k in labels}, next(s for s in seqs if s.name == video_seq),
                                 opts.video, frames=opts.video_frames, fps=opts.video_fps)
        notes.append(f"track video ({' | '.join(labels)}) written to {path}")
    meta = {"model": adapter.name, "sequences": [s.name for s in seqs], "tracker": dataclasses.asdict(opts.tracker),
            "threads": opts.threads, "runtime": opts.runtime, "seed": opts.seed, "img_size": opts.img_size,
            "calibration_images": opts.calib_images, "per_sequence": per_seq, "results_dir": str(out_dir),
            "evaluators": "motmetrics (MOTA, IDF1, IDSW) + " + ("TrackEval (HOTA)" if not hota_note else "no HOTA")}
    cols = ["model", "mota_pct", "d_mota_pct", "idf1_pct", "d_idf1_pct", "hota_pct", "d_hota_pct", "id_switches",
            "fp", "fn", "fps", "fps_ratio", "detector_ms", "tracker_ms"]
    title = (f"{adapter.name} + ByteTrack: float vs int8 on {len(seqs)} sequences "
             f"({opts.threads} threads, {opts.runtime})")
    return JobResult(title, rows, cols, meta, notes)


def _id_color(track_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(int(track_id) * 7919)
    return tuple(int(c) for c in rng.integers(60, 256, 3))  # type: ignore[return-value]


def draw_tracks(image: np.ndarray, tracks: Any, title: str) -> Any:
    """A PIL image of `image` with each track's box and id in a colour fixed per id."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(image)
    d = ImageDraw.Draw(im)
    for tid, (x1, y1, x2, y2) in zip(tracks.ids.tolist(), tracks.boxes.tolist()):
        color = _id_color(tid)
        d.rectangle([x1, y1, x2, y2], outline=color, width=2)
        d.rectangle([x1, max(y1 - 11, 0), x1 + 8 + 6 * len(str(tid)), max(y1 - 11, 0) + 11], fill=color)
        d.text((x1 + 2, max(y1 - 11, 0)), str(tid), fill=(0, 0, 0))
    d.rectangle([0, 0, 8 + 6 * len(title), 12], fill=(0, 0, 0))
    d.text((3, 1), title, fill=(255, 255, 255))
    return im


def write_track_video(runs: dict[str, Any], seq: Any, path: str | Path, *, frames: int = 90, fps: float = 10.0) -> Path:
    """Side-by-side frames (first run left) as GIF or MP4 (by suffix) via qdet.analysis.frames."""
    from PIL import Image

    from qdet.analysis.frames import write_gif, write_mp4
    from qdet.data.coco import load_image

    path = Path(path)
    labels = list(runs)
    n = min(frames, *(len(r.tracks) for r in runs.values()))
    with tempfile.TemporaryDirectory() as tmp:
        pngs = []
        for f in range(n):
            image = load_image(seq.frame_path(f + 1))
            panels = [draw_tracks(image, runs[k].tracks[f], f"{k} frame {f + 1}") for k in labels]
            canvas = Image.new("RGB", (sum(p.width for p in panels), panels[0].height))
            x = 0
            for p in panels:
                canvas.paste(p, (x, 0))
                x += p.width
            pngs.append(Path(tmp) / f"{f:05d}.png")
            canvas.save(pngs[-1])
        writer = write_mp4 if path.suffix.lower() == ".mp4" else write_gif
        return writer(pngs, path, fps=fps)


# ---- CLI ----
def add_track_parser(sub: Any) -> None:
    from qdet import cli

    t = sub.add_parser("track", help="ByteTrack with the float and the int8 detector: MOTA, IDF1, HOTA, FPS",
                       description="Multi-object tracking (ByteTrack) on MOTChallenge-format sequences with the "
                                   "float and the int8 detector side by side.")
    t.add_argument("model", help="detector (yolov5n, yolov5s, ...; see `qdet list`)")
    t.add_argument("--sequences", required=True, metavar="DIR",
                   help="a MOTChallenge sequence folder or a folder of them (seqinfo.ini, img1/, gt/gt.txt)")
    t.add_argument("--synthesize", type=cli.POSITIVE, metavar="N",
                   help="first write N SYNTHETIC sequences (virtual camera over the bundled COCO val2017 images) "
                        "into --sequences (must not exist yet)")
    t.add_argument("--synth-frames", type=cli.POSITIVE, default=60, help="frames per synthetic sequence (default: 60)")
    t.add_argument("--weights", metavar="PATH", help=cli.WEIGHTS_HELP)
    t.add_argument("--runtime", default="auto", help=cli._runtime_help())
    t.add_argument("--threads", type=cli.THREADS, default=2, help="torch and runtime threads (default: 2)")
    t.add_argument("--seed", type=cli.SEED, default=0, help="calibration subset and synthetic sequences seed (default: 0)")
    t.add_argument("--img-size", type=cli.IMG_SIZE, default=640, help="detector input long side (default: 640)")
    t.add_argument("--max-frames", type=cli.POSITIVE, help="track only the first N frames of each sequence")
    t.add_argument("--track-thresh", type=float, default=0.5, help="ByteTrack high-score threshold (default: 0.5)")
    t.add_argument("--match-thresh", type=float, default=0.8, help="first-association cost threshold (default: 0.8)")
    t.add_argument("--track-buffer", type=cli.NON_NEGATIVE, default=30, help="frames a lost track is kept (default: 30)")
    t.add_argument("--min-visibility", type=float, default=0.0,
                   help="ignore gt pedestrians less visible than this (MOT17 visibility column; default: 0)")
    t.add_argument("--out-dir", metavar="DIR", help="MOTChallenge result files (default: runs/track/<model>)")
    t.add_argument("--video", metavar="PATH", help="GIF or MP4 (by suffix) of track ids: float left, int8 right")
    t.add_argument("--video-sequence", metavar="NAME", help="sequence for --video (default: the first)")
    t.add_argument("--video-frames", type=cli.POSITIVE, default=90, help="frames in --video (default: 90)")
    cli._add_quant_options(t)
    cli._add_json_progress(t)
    t.set_defaults(num_classes=None, cfg=None, eval_images=None)


def cmd_track(args: argparse.Namespace) -> None:
    from qdet import cli

    for name in ("track_thresh", "match_thresh", "min_visibility"):
        v = getattr(args, name)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
    if args.video is not None and Path(args.video).suffix.lower() not in (".gif", ".mp4"):
        raise ConfigError(f"--video {args.video!r}: give a .gif or .mp4 path")
    adapter = cli.resolve_adapter(args)
    if args.synthesize:
        _synthesize(args)
    load_sequences(args.sequences)  # bad sequences fail before the model is built
    model = cli.build_model(adapter, args)
    cfg = cli.config_from_args(args)
    tracker = ByteTrackConfig(track_thresh=args.track_thresh, match_thresh=args.match_thresh,
                              track_buffer=args.track_buffer)
    opts = TrackOptions(sequences=args.sequences, runtime=args.runtime, threads=args.threads,
                        calib_images=args.calib_images, calib_batch=args.calib_batch, seed=args.seed,
                        img_size=args.img_size, max_frames=args.max_frames, min_visibility=args.min_visibility,
                        tracker=tracker, out_dir=args.out_dir, video=args.video, video_sequence=args.video_sequence,
                        video_frames=args.video_frames, progress=not args.no_progress)
    cli._emit(track_job(adapter, model, cfg, opts), args)


def _synthesize(args: argparse.Namespace) -> None:
    from qdet.data.mot_synth import CameraConfig, build_sequences
    from qdet.paths import assets_dir

    out = Path(args.sequences)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--synthesize: {out} exists and is not empty; give a new folder (or drop --synthesize)")
    coco = assets_dir() / "coco"
    ann = coco / "annotations" / "instances_val2017_subset.json"
    if not ann.is_file():
        raise DataError(f"--synthesize needs the bundled COCO val2017 images; {ann} not found")
    build_sequences(out, coco / "val2017", ann, n_sequences=args.synthesize,
                    camera=CameraConfig(frames=args.synth_frames), seed=args.seed, progress=not args.no_progress)
