"""The metrics table: one row of reconstruction and sparsity metrics (`traitscope.sae.metrics`) per
method, an SAE and the baselines that need none, as CSV and markdown."""

import csv
from pathlib import Path

from traitscope.files import atomic_open, atomic_write_bytes
from traitscope.sae.metrics import Metrics

COLUMNS = ("method", "nmse", "explained_variance", "l0", "dead_frac", "dense_frac", "n_codes", "n_tokens")


def write_table(rows: dict[str, Metrics], csv_fpath: Path, md_fpath: Path) -> str:
    """Write the metrics table (method -> metrics) as CSV and markdown; returns the markdown."""
    with atomic_open(csv_fpath, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for method, m in rows.items():
            writer.writerow([method, *(getattr(m, c) for c in COLUMNS[1:])])
    lines = ["| method | NMSE | explained var. | L0 | dead | dense | codes | tokens |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, m in rows.items():
        lines.append(f"| {method} | {m.nmse:.4f} | {m.explained_variance:.4f} | {m.l0:.1f} | "
                     f"{m.dead_frac:.1%} | {m.dense_frac:.1%} | {m.n_codes} | {m.n_tokens} |")
    md = "\n".join(lines) + "\n"
    atomic_write_bytes(md_fpath, md.encode())
    return md
