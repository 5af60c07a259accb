"""Cube build throughput and memory on a province-scale synthetic province.

Figure: MB/s of cube written (build_cube + write_cube, from the source files to cube.zarr).
Baseline, measured in the same run: raw read throughput of the same source GeoTIFFs (rasterio, whole
bands decoded into memory). Memory: peak RSS of the cube-building process, beside the cube's size
(out-of-core means the peak stays well below it).

    python benchmarks/cube.py                 # 4096 x 4096 px, 12 bands
    python benchmarks/cube.py --size 2048     # quicker

Each measurement runs in a fresh subprocess so that one does not inflate the other's peak memory.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"benchmark step failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


GENERATE = """
import json, time, sys
from pathlib import Path
from pipeline.data.synthetic import write_province
t = time.perf_counter()
p = write_province(Path({root!r}), size={size}, seed=0, chunk={chunk})
print(json.dumps({{"config": str(p.config_path), "seconds": time.perf_counter() - t}}))
"""

RAW_READ = """
import json, time, resource
import rasterio
from pipeline.config import RunConfig
from pipeline.data.grid import is_raster
cfg = RunConfig.from_yaml({config!r})
paths = [cfg.resolve(l.path) for l in cfg.layers if is_raster(cfg.resolve(l.path))]
nbytes = 0
t = time.perf_counter()
for p in paths:
    with rasterio.open(p) as src:
        for b in range(1, src.count + 1):
            nbytes += src.read(b).nbytes
sec = time.perf_counter() - t
print(json.dumps({{"raw_mb": nbytes / 2**20, "seconds": sec, "files": [str(p) for p in paths]}}))
"""

BUILD = """
import json, time, resource
import dask
from pipeline.config import RunConfig
from pipeline.data.cube import write_cube, open_cube
from pipeline.data.ingest import build_cube
cfg = RunConfig.from_yaml({config!r})
dask.config.set(scheduler="threads", num_workers={threads})
t = time.perf_counter()
ds = build_cube(cfg)
peak_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
write_cube(ds, {out!r})
sec = time.perf_counter() - t
c = open_cube({out!r})
cube_mb = c.evidence.nbytes / 2**20 + c.valid.nbytes / 2**20
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"cube_mb": cube_mb, "seconds": sec, "peak_rss_mb": peak, "peak_rss_after_build_mb": peak_build, "bands": int(c.sizes["band"]),
                  "shape": [int(c.sizes["y"]), int(c.sizes["x"])]}}))
"""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="province size in pixels a side")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="keep inputs and cube here (default: a temporary folder)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mpm-bench-cube-") as tmp:
        root = Path(args.workdir or tmp)
        existing = root / "province" / "province.yaml"
        if args.workdir and existing.exists() and f"size {args.size}," in existing.read_text():
            gen = {"config": str(existing), "seconds": 0.0}
            print(f"synthetic province {args.size} x {args.size}: reused from {existing.parent}")
        else:
            gen = _child(GENERATE.format(root=str(root / "province"), size=args.size, chunk=args.chunk))
            print(f"synthetic province {args.size} x {args.size}: generated in {gen['seconds']:.1f} s")
        raw = _child(RAW_READ.format(config=gen["config"]))
        raw_rate = raw["raw_mb"] / raw["seconds"]
        print(f"baseline  raw GeoTIFF read: {raw['raw_mb']:.0f} MB in {raw['seconds']:.2f} s = {raw_rate:.0f} MB/s")
        import shutil

        shutil.rmtree(root / "cube.zarr", ignore_errors=True)
        build = _child(BUILD.format(config=gen["config"], out=str(root / "cube.zarr"), threads=args.threads))
        rate = build["cube_mb"] / build["seconds"]
        print(
            f"cube      {build['bands']} bands x {build['shape'][0]} x {build['shape'][1]} = {build['cube_mb']:.0f} MB "
            f"written in {build['seconds']:.1f} s = {rate:.1f} MB/s"
        )
        print(f"ratio     cube write / raw read = {rate / raw_rate:.3f}")
        print(
            f"memory    peak RSS {build['peak_rss_mb']:.0f} MB = {build['peak_rss_mb'] / build['cube_mb']:.2f} x the cube size "
            f"({build['peak_rss_after_build_mb']:.0f} MB once the lazy cube is built: mostly imports; the point samples wait on disk)"
        )
        result = {
            "size": args.size,
            "bands": build["bands"],
            "cube_mb": round(build["cube_mb"], 1),
            "cube_seconds": round(build["seconds"], 2),
            "cube_mb_per_s": round(rate, 2),
            "raw_read_mb": round(raw["raw_mb"], 1),
            "raw_read_mb_per_s": round(raw_rate, 1),
            "ratio_cube_to_raw": round(rate / raw_rate, 4),
            "peak_rss_mb": round(build["peak_rss_mb"], 1),
            "peak_rss_over_cube": round(build["peak_rss_mb"] / build["cube_mb"], 3),
            "peak_rss_after_build_mb": round(build["peak_rss_after_build_mb"], 1),
            "threads": args.threads,
        }
        print(json.dumps(result))
        return result


if __name__ == "__main__":
    main()
