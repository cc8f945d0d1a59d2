#!/usr/bin/env python3
"""The up-front check of a folder's files, by thread count, on a local disk.

    python benchmarks/folder_check.py [--files=4000] [--rounds=7]

Writes `--files` small PNGs (64x64 colour) into a temporary folder, then times
`core.sources.scan` (the check every folder split gets before training: each file's
header and end) with 1 to 32 threads, interleaved round by round in one process, two
ways: with the files in the OS cache (the check's own cost: Pillow reading headers,
mostly under the GIL), and evicted from it before each pass (`posix_fadvise`
DONTNEED, no root needed: the first run on a folder, reading the disk). Ratios are to
the local default, `sources._SCAN_THREADS_LOCAL`, in the same round. An object store (gs://) is not measured
here: there each file costs requests of tens of ms, which tf.io.gfile waits for
without the GIL, so threads overlap them (`_SCAN_THREADS_REMOTE`).
Writes results/folder_check.{json,md}.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("files", 4000, "PNG files to write and check.", lower_bound=1)
flags.DEFINE_integer("rounds", 7, "Interleaved rounds (medians and ranges reported).", lower_bound=1)
flags.DEFINE_list("threads", ["1", "2", "4", "8", "32"], "Thread counts to time.")
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")


def main(argv):
    del argv
    import numpy as np
    from PIL import Image

    from core import sources

    default = sources._SCAN_THREADS_LOCAL
    counts = sorted({int(t) for t in FLAGS.threads} | {default})
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        paths = [os.path.join(folder, f"{i:06d}.png") for i in range(FLAGS.files)]
        for path in paths:
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(path)
        def evict():  # drop the files' pages from the OS cache
            for path in paths:
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)

        cases = {(cache, n): [] for cache in ("cached", "evicted") for n in counts}
        sources.scan(paths)  # warm-up: the OS cache, Pillow's plugins
        for _ in range(FLAGS.rounds):
            for cache, n in cases:
                if cache == "evicted":
                    evict()
                sources._SCAN_THREADS_LOCAL = n
                start = time.perf_counter()
                infos, bad = sources.scan(paths)
                cases[cache, n].append(len(paths) / (time.perf_counter() - start))
                assert not bad and len(infos) == len(paths)
        sources._SCAN_THREADS_LOCAL = default
    ratios = {(c, n): [a / b for a, b in zip(r, cases[c, default])] for (c, n), r in cases.items()}
    context = common.machine_context(with_peaks=False)
    payload = {"context": context, "files": FLAGS.files, "rounds": FLAGS.rounds,
               "default_threads": default,
               "files_per_s": {f"{c} {n}": common.summarize(r) for (c, n), r in cases.items()},
               "vs_default": {f"{c} {n}": common.summarize(r) for (c, n), r in ratios.items()}}
    lines = ["# The up-front check of a folder's files, by thread count\n",
             common.context_markdown(context),
             f"{FLAGS.files:,} 64x64 PNGs on the local disk; medians of {FLAGS.rounds} "
             "interleaved rounds, ratios to the default thread count in the same round "
             "(`python benchmarks/folder_check.py`).\n",
             "| files | threads | files/s | range | vs the default |",
             "| --- | ---: | ---: | --- | ---: |"]
    for (c, n), r in cases.items():
        q = ratios[c, n]
        lines.append(f"| {'in the OS cache' if c == 'cached' else 'evicted from it'} | "
                     f"{n}{' (default)' if n == default else ''} | {statistics.median(r):,.0f} | "
                     f"{min(r):,.0f}-{max(r):,.0f} | {statistics.median(q):.2f}x "
                     f"({min(q):.2f}-{max(q):.2f}x) |")
    common.write_report(FLAGS.output_dir, "folder_check", payload, lines)


if __name__ == "__main__":
    common.run(main)
