"""The quantized levels of an evaluation result ("B:granularity" -> its FID, KID, loss increase and displacement),
read the same way from results of every version. Only the standard library: tables and model cards read them."""

from __future__ import annotations


def quantization_levels(result: dict) -> dict[str, dict]:
    """The quantized levels of a result by "B:granularity", also from results written before levels had a
    granularity each (one `granularity` and fid/kid/loss_increase/pixel_displacement keyed by bits)."""
    q = result.get("quantization")
    if not q:
        return {}
    if "levels" in q:
        return q["levels"]
    measures = ("fid", "kid", "loss_increase", "pixel_displacement")
    return {
        f"{bits}:{q['granularity']}": {"bits": int(bits), "granularity": q["granularity"]}
        | {m: q[m][bits] for m in measures if m in q}
        for bits in q["fid"]
    }
