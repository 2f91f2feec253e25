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


def quantization_by_bits(result: dict) -> dict[str, dict]:
    """The quantized levels by bits ("5"), for results whose levels share one granularity (a study's, whose claims
    name the bits); a result with several granularities raises."""
    levels = quantization_levels(result)
    granularities = {level["granularity"] for level in levels.values()}
    if len(granularities) > 1:
        raise ValueError(f"these results mix granularities ({', '.join(sorted(granularities))}): name the level")
    return {str(level["bits"]): level for level in levels.values()}
