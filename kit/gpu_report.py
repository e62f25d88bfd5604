"""`make gpu-check`'s report: the rows a check wrote (gpu-check-<time>.jsonl, finished or cut off) read back into
one summary, what each measured epoch's peak memory would be on a T4, and the table printed at the end and by
`hcd-kit gpu-check --rows`. The check itself, which runs the rows, is kit/gpu_check.py.
"""

from __future__ import annotations

from pathlib import Path

from .competition import TRAIN_IMAGES
from .data import ROW_BYTES
from .io import read_json_lines

SCALE_OUT_CONFIG = "baseline_bn"     # the config of the scale-out rows (one card against several)

def read_rows(path: Path) -> list[dict]:
    """The rows a check wrote, finished or cut off."""
    return read_json_lines(path)


# A 16 GB T4 as nvidia-smi shows it (15,360 MiB), less what tensors never hold: the CUDA context, cuBLAS/cuDNN
# workspaces (~600 MiB together) and the caching allocator's fragmentation (~10% over the tensors' peak). An
# estimate for planning, not a measurement on a T4.
T4_MEMORY_MB, T4_CONTEXT_MB, ALLOCATOR_OVERHEAD = 15_360, 600, 1.10


def t4_fit(row: dict) -> dict | None:
    """From an epoch row's measured peaks: the peak a T4 would see at the same batch with the competition's split
    held on the GPU (as the kit holds it there: 6.1 GB is under half a T4's spare memory), and whether it fits."""
    peaks = [row.get(key) for key in ("peak_memory_mb", "tta_peak_memory_mb", "swa_bn_peak_memory_mb")]
    peaks = [peak for peak in peaks if peak is not None]
    if row.get("status") != "ok" or not peaks:
        return None
    model_mb = max(peaks) - (row.get("resident_split_mb") or 0.0)
    split_mb = TRAIN_IMAGES * ROW_BYTES / 2**20
    peak_mb = model_mb + split_mb
    return {"config": row["config"], "batch_size": row.get("batch_size"), "peak_mb": peak_mb, "split_mb": split_mb,
            "fits": peak_mb * ALLOCATOR_OVERHEAD + T4_CONTEXT_MB <= T4_MEMORY_MB}


def t4_fits(epochs: list[dict]) -> list[dict]:
    """One `t4_fit` per config, from its fp16 eager row (a T4's precision) where there is one, else its first ok
    eager row."""
    fits = {}
    for row in sorted(epochs, key=lambda r: r.get("precision") != "fp16"):
        if row.get("compiled") or row.get("swa") or row["config"] in fits:
            continue
        fit = t4_fit(row)
        if fit is not None:
            fits[row["config"]] = fit
    return list(fits.values())


def summary(rows: list[dict]) -> dict:
    """The report (card, the competition split's fit, epochs, correctness, T4 fits, bench, TTA, scale-out, passed)
    rebuilt from a check's rows, finished or cut off."""
    header = next((r for r in rows if r["kind"] == "header"), {})
    report = {key: value for key, value in header.items() if key != "kind"}
    report["resident"] = next((r for r in rows if r["kind"] == "resident"), None)
    report["epochs"] = [r for r in rows if r["kind"] == "epoch"]
    report["correctness"] = [r for r in rows if r["kind"] == "correctness"]
    report["t4"] = t4_fits(report["epochs"])
    report["bench"] = next((r for r in rows if r["kind"] == "bench"), None)
    report["tta"] = next((r for r in rows if r["kind"] == "tta"), None)
    report["scale_out"] = [r for r in rows if r["kind"] == "scale_out"]
    ran = report["epochs"] + report["correctness"] + report["scale_out"] + \
        [r for r in (report["tta"], report["resident"]) if r]
    report["passed"] = all(r["status"] in ("ok", "skipped") for r in ran) and \
        any(r["status"] == "ok" for r in report["epochs"])
    return report


def megabytes(value) -> str:
    return f"{value:>9,.0f}" if value is not None else f"{'-':>9}"


def format_run(row: dict) -> str:
    mode = "compiled" if row["compiled"] else "SWA" if row.get("swa") else "eager"
    what = f"{row['config']:<18} {row['precision']:<5} {mode:<9}"
    if row["status"] == "skipped":
        return f"  {what} skipped ({row['error']})"
    if row["status"] != "ok":
        return f"  {what} FAILED: {row['error']}"
    line = (f"  {what} {row['train_images_per_s']:>10,.0f} {row['epoch_seconds']:>8.1f} "
            f"{megabytes(row.get('peak_memory_mb'))} {megabytes(row.get('tta_peak_memory_mb'))} {row['val_auc']:>8.4f}")
    if row.get("compile_seconds") is not None:
        line += f"  compile {row['compile_seconds']:.0f} s (first epoch {row['first_epoch_seconds']:.1f} s)"
    if row.get("swa_bn_seconds") is not None:
        line += f"  BatchNorm pass {row['swa_bn_seconds']:.1f} s, peak {megabytes(row.get('swa_bn_peak_memory_mb')).strip()} MB"
    return line


def format_resident(row: dict) -> str:
    what = f"the competition's train split ({row['images']:,} patches, {row['split_mb']:,.0f} MB)"
    if row["status"] == "skipped":
        return f"  {what}: {row['error']}"
    if row["status"] != "ok":
        return f"  {what}: FAILED: {row['error']}"
    verdict = (f"held on the GPU (allocated and filled in {row['fill_seconds']:.2f} s)" if row["resident"] else
               f"not held on the GPU (over {row['share']:.0%} of the spare memory): batches come from the "
               f"memory-mapped cache through pinned memory")
    return (f"  {what}: {verdict}; {row['spare_mb']:,.0f} MB spare of {row['total_mb']:,.0f} MB")


def format_check(row: dict) -> str:
    if row["status"] == "skipped":
        return f"  {row['check']}: skipped ({row['error']})"
    if row["status"] != "ok":
        return f"  {row['check']}: FAILED: {row['error']}"
    found = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                      for key, value in row.items() if key not in ("kind", "check", "status", "seconds", "where"))
    return f"  {row['check']}: ok in {row['seconds']:.1f} s ({found})"


def format_t4(fit: dict) -> str:
    return (f"  {fit['config']}: fits a 16 GB T4 at batch {fit['batch_size']}: {'yes' if fit['fits'] else 'NO'} "
            f"(peak {fit['peak_mb']:,.0f} MB with the {fit['split_mb']:,.0f} MB split held on the GPU; "
            f"{T4_MEMORY_MB - T4_CONTEXT_MB:,} MB usable, {ALLOCATOR_OVERHEAD - 1:.0%} allocator margin)")


def format_report(report: dict) -> str:
    from .bench import format_table

    took = f"{report['seconds'] / 60:.1f} min" if "seconds" in report else "cut off before its end"
    lines = [f"{report['card']}; torch {report['torch']} (CUDA {report['cuda']}); kit precision "
             f"{report['kit_precision']}; {report['images']:,} patches; {took}", ""]
    if report.get("resident"):
        lines += [format_resident(report["resident"]), ""]
    lines += [f"  {'config':<18} {'prec.':<5} {'mode':<9} {'train img/s':>10} {'epoch s':>8} {'peak MB':>9} "
              f"{'TTA MB':>9} {'val AUC':>8}", "  " + "-" * 84]
    lines += [format_run(row) for row in report["epochs"]]
    if report.get("t4"):
        lines += ["", "  a 16 GB T4 (an estimate from the peaks above, at the competition's size):"]
        lines += [format_t4(fit) for fit in report["t4"]]
    if report.get("correctness"):
        lines += ["", "  correctness on this card:"] + [format_check(row) for row in report["correctness"]]
    tta = report.get("tta")
    lines += ["", f"  TTA prediction ({tta['config']}): " + (
        f"{tta['images_per_s']:,.0f} test images/s × {tta['views']} views" if tta["status"] == "ok"
        else f"FAILED: {tta['error']}") if tta else "  TTA prediction: not run (time budget)"]
    lines += ["", format_table(report["bench"]) if report.get("bench") else "  bench: not run (time budget)"]
    single = next((r for r in report["epochs"] if r["config"] == SCALE_OUT_CONFIG and r["precision"] == "auto"
                   and not r["compiled"] and not r.get("swa") and r["status"] == "ok"), None)
    for row in report.get("scale_out", []):
        if row["status"] != "ok":
            lines.append(f"  {row['config']} {row['mode']}: FAILED: {row['error']}")
            continue
        versus = f" ({row['train_images_per_s'] / single['train_images_per_s']:.2f}× one process)" if single else ""
        lines.append(f"  {row['config']} {row['mode']}: {row['train_images_per_s']:,.0f} train images/s{versus}, "
                     f"epoch {row['epoch_seconds']:.1f} s" + (f"; {row['syncs']}" if row.get("syncs") else ""))
    lines += ["", "passed" if report["passed"] else "FAILED: see the rows above"]
    return "\n".join(lines)
