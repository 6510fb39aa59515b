"""Convert VL-RewardBench to rdpo's pairwise preference format (for `rdpo.tools.evaluate judge`).

    python scripts/convert_vlrewardbench.py INPUT OUT_DIR

INPUT is a JSONL or Parquet export of VL-RewardBench (the data cannot be downloaded here; get it
with `datasets` and `ds.to_parquet(...)` or `ds.to_json(...)` where you can). Its fields:
``id``, ``query`` (the instruction), ``response`` (two answers), ``human_ranking`` (a rank per
answer, 0 = best) and ``image`` (a `datasets` image: ``{"bytes", "path"}``, or a path, or
base64). Writes ``OUT_DIR/pairs.jsonl`` (``id``, ``images``, ``instruction``, ``responses``,
``preferred``) and ``OUT_DIR/images/``. Records with tied ranks or not exactly two responses
are skipped and counted, never guessed.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
from pathlib import Path

from PIL import Image


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {err}") from None
    return rows


def image_bytes(value, base: Path) -> bytes:
    """Raw image bytes from a `datasets` image dict, a file path or a base64 string."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise ValueError("image: expected {'bytes': ...}, a path or base64")
    path = Path(value) if Path(value).is_absolute() else base / value
    if path.is_file():
        return path.read_bytes()
    try:
        return base64.b64decode(value.split(",", 1)[-1], validate=True)
    except ValueError:
        raise ValueError(f"image: {value[:60]!r} is neither a file nor base64") from None


def convert(input_path: str | Path, out_dir: str | Path) -> dict:
    """Write pairs.jsonl and images/; return counts (written, skipped by reason)."""
    input_path, out_dir = Path(input_path), Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "skipped_tie": 0, "skipped_not_two": 0}
    problems = []
    with (out_dir / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for i, row in enumerate(read_rows(input_path), 1):
            where = f"{input_path}: record {i}"
            missing = [k for k in ("query", "response", "human_ranking", "image") if k not in row]
            if missing:
                problems.append(f"{where}: missing field(s) {missing}")
                continue
            responses, ranks = list(row["response"]), list(row["human_ranking"])
            if len(responses) != 2 or len(ranks) != 2:
                counts["skipped_not_two"] += 1
                continue
            if ranks[0] == ranks[1]:
                counts["skipped_tie"] += 1
                continue
            rid = re.sub(r"[^A-Za-z0-9_.-]", "_", str(row.get("id", i)))
            try:
                raw = image_bytes(row["image"], input_path.parent)
                with Image.open(io.BytesIO(raw)) as im:
                    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(im.format, "png")
                    if ext == "png" and im.format != "PNG":
                        buf = io.BytesIO()
                        im.convert("RGB").save(buf, format="PNG")
                        raw = buf.getvalue()
            except Exception as err:
                problems.append(f"{where}: {err}")
                continue
            name = f"images/{rid}.{ext}"
            (out_dir / name).write_bytes(raw)
            f.write(json.dumps({"id": rid, "images": [name], "instruction": row["query"],
                                "responses": responses,
                                "preferred": 0 if ranks[0] < ranks[1] else 1},
                               ensure_ascii=False) + "\n")
            counts["written"] += 1
    if problems:
        raise ValueError("\n".join(problems))
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", help="VL-RewardBench export (.jsonl or .parquet)")
    p.add_argument("out_dir", help="where pairs.jsonl and images/ are written")
    args = p.parse_args(argv)
    try:
        counts = convert(args.input, args.out_dir)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
