"""Vendor genai-prices' LLM price table as prices.json beside otrace.py, with its license.

    python scripts/prices.py [--wheel FILE] [--out DIR]        (or: make prices)

otrace computes cost_usd at ingest for calls that report tokens but no cost. Its prices are data,
not code: pydantic's genai-prices (MIT, https://github.com/pydantic/genai-prices), the maintained
table behind Logfire and Pydantic AI. This script asks pip for the newest release on PyPI
(`pip download --no-deps`), reads the table out of the wheel's genai_prices/data.py without running
it (the module is generated code: constructor calls over literals, parsed here with `ast`), and
writes two files:

- prices.json: a header (source, version, when vendored, license, units) and the providers, each
  with its own matching rules (id, provider_match, model_match, fallback_model_providers) and its
  models, each with its `match` clause and prices, in genai-prices' own order and JSON shape (the
  shape of its data.json), so otrace can match exactly as genai-prices does. Slimmed to what otrace
  prices: per-token input, output, cache read and cache write prices (flat or tiered) and the
  per-request price, under their time constraints. Price variants (batch, service tiers, fast
  mode: they need request context otrace does not have), extractors, descriptions and URLs are left
  out; a model priced only in units otrace does not count (audio hours, images, searches...) keeps
  its entry with empty prices, so it still wins the match and otrace leaves its cost null.
- prices.LICENSE: the upstream license text, unchanged.

Written beside otrace.py, it also pins requirements-dev.txt's genai-prices to the same release, which
the tests check otrace's matcher against.

Anything in data.py this script does not recognise stops it with an error: better no new table
than a wrong one. --wheel uses a wheel already downloaded (no network).
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import email.parser
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from decimal import Decimal
from pathlib import Path
from typing import Any

PACKAGE = "genai-prices"
UPSTREAM = "https://github.com/pydantic/genai-prices"
DATA_MODULE = "genai_prices/data.py"
# The price keys otrace can use (the units of genai_prices/data_units.py it counts), in that order.
KEPT_PRICES = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "requests_kcount")
UNITS = {
    "input_mtok": "USD per 1M input tokens not read from or written to the cache",
    "output_mtok": "USD per 1M output tokens (reasoning tokens included)",
    "cache_read_mtok": "USD per 1M input tokens read from the cache",
    "cache_write_mtok": "USD per 1M input tokens written to the cache",
    "requests_kcount": "USD per 1000 requests",
}
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------
# Reading data.py: generated Python made of constructor calls over literals.


def literal(node: ast.expr) -> Any:
    """The value of one expression of data.py: a constructor call becomes {"__type": name, **kwargs}."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List):
        return [literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        return {literal(k): literal(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
    if isinstance(node, ast.Attribute) and ast.unparse(node) in ("datetime.UTC", "datetime.timezone.utc"):
        return dt.UTC
    if isinstance(node, ast.Call):
        return call(node)
    raise ValueError(f"unexpected expression in {DATA_MODULE}, line {node.lineno}: {ast.unparse(node)[:80]}")


def call(node: ast.Call) -> Any:
    """A Decimal, date or time call as its value, any other constructor as a typed dict."""
    name = ast.unparse(node.func)
    args = [literal(arg) for arg in node.args]
    kwargs = {kw.arg: literal(kw.value) for kw in node.keywords if kw.arg is not None}
    if len(kwargs) != len(node.keywords):
        raise ValueError(f"**kwargs in {DATA_MODULE}, line {node.lineno}")
    if name == "Decimal":
        return Decimal(*args)
    if name == "datetime.date":
        return dt.date(*args, **kwargs)
    if name == "datetime.time":
        return dt.time(*args, **kwargs)
    if args or not name.isidentifier():
        raise ValueError(f"unexpected call in {DATA_MODULE}, line {node.lineno}: {name}")
    return {"__type": name, **kwargs}


def read_providers(source: str) -> list[dict[str, Any]]:
    """The `providers = [...]` list of data.py, as typed dicts."""
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.AnnAssign | ast.Assign):
            targets = [statement.target] if isinstance(statement, ast.AnnAssign) else statement.targets
            if any(isinstance(t, ast.Name) and t.id == "providers" for t in targets) and statement.value:
                return literal(statement.value)
    raise ValueError(f"no `providers` list in {DATA_MODULE}")


# ---------------------------------------------------------------------------------------------------
# Slimming to otrace's shape (genai-prices' data.json shape, fewer fields).

CLAUSES = {"ClauseEquals": "equals", "ClauseStartsWith": "starts_with", "ClauseEndsWith": "ends_with",
           "ClauseContains": "contains", "ClauseRegex": "regex", "ClauseOr": "or_", "ClauseAnd": "and_"}


def clause(raw: dict[str, Any]) -> dict[str, Any]:
    """A match clause as data.json writes it: {"equals": "gpt-4o"}, {"or": [...]}, ..."""
    field = CLAUSES.get(raw["__type"])
    if field is None or set(raw) != {"__type", field}:
        raise ValueError(f"unknown match clause {raw}")
    if field in ("or_", "and_"):
        return {field[:-1]: [clause(item) for item in raw[field]]}
    return {field: raw[field]}


def number(value: Decimal) -> int | float:
    """A price as a JSON number that reads back as exactly the same decimal."""
    if value == value.to_integral_value():
        return int(value)
    as_float = float(value)
    if Decimal(repr(as_float)) != value:
        raise ValueError(f"price {value} does not survive a float")
    return as_float


def price_value(raw: Any) -> Any:
    """One price: a number, or {"base": n, "tiers": [{"start": tokens, "price": n}]}."""
    if isinstance(raw, Decimal):
        return number(raw)
    if isinstance(raw, dict) and set(raw) == {"__type", "base", "tiers"} and raw["__type"] == "TieredPrices":
        tiers = sorted(raw["tiers"], key=lambda tier: tier["start"])      # TieredPrices.__post_init__
        return {"base": number(raw["base"]),
                "tiers": [{"start": tier["start"], "price": number(tier["price"])} for tier in tiers]}
    raise ValueError(f"unknown price {raw}")


def model_price(raw: dict[str, Any], dropped: dict[str, int]) -> dict[str, Any]:
    """The kept prices of one ModelPrice; the others are counted in `dropped`."""
    if raw.get("__type") != "ModelPrice":
        raise ValueError(f"unknown prices {raw}")
    out = {}
    for key, value in raw.items():
        if key == "__type" or value is None:
            continue
        if key in KEPT_PRICES:
            out[key] = price_value(value)
        else:
            dropped[key] = dropped.get(key, 0) + 1
    return {key: out[key] for key in KEPT_PRICES if key in out}


def constraint(raw: dict[str, Any] | None) -> dict[str, str] | None:
    """A start date ("2025-06-01", UTC day) or a daily UTC window ("16:30:00" to "00:30:00")."""
    if raw is None:
        return None
    if raw["__type"] == "StartDateConstraint":
        return {"start_date": raw["start_date"].isoformat()}
    if raw["__type"] == "TimeOfDateConstraint":
        return {"start_time": utc_time(raw["start_time"]), "end_time": utc_time(raw["end_time"])}
    raise ValueError(f"unknown constraint {raw}")


def utc_time(value: dt.time) -> str:
    """A time of day in UTC, as genai-prices compares it (naive times are UTC)."""
    if value.tzinfo is not None:
        value = dt.datetime.combine(dt.date(1970, 1, 1), value).astimezone(dt.UTC).time()
    return value.replace(tzinfo=None).isoformat()


def prices(raw: Any, dropped: dict[str, int]) -> Any:
    """A model's prices: one price object, or the list of conditional prices (the last active wins)."""
    if isinstance(raw, dict):
        return model_price(raw, dropped)
    out = []
    for item in raw:
        if item.get("__type") != "ConditionalPrice":
            raise ValueError(f"unknown conditional price {item}")
        entry: dict[str, Any] = {"prices": model_price(item["prices"], dropped)}
        if (when := constraint(item.get("constraint"))) is not None:
            entry = {"constraint": when, **entry}
        out.append(entry)
    return out


MODEL_FIELDS = {"__type", "id", "match", "name", "description", "context_window", "price_comments",
                "deprecated", "prices", "price_variants"}
PROVIDER_FIELDS = {"__type", "id", "name", "api_pattern", "pricing_urls", "description", "price_comments",
                   "model_match", "provider_match", "extractors", "fallback_model_providers", "models"}


def model(raw: dict[str, Any], dropped: dict[str, int]) -> dict[str, Any]:
    """One model: id, match clause, prices."""
    if raw.get("__type") != "ModelInfo" or not set(raw) <= MODEL_FIELDS:
        raise ValueError(f"unknown model fields {sorted(set(raw) - MODEL_FIELDS)}")
    if raw.get("price_variants"):
        dropped["price_variants"] = dropped.get("price_variants", 0) + 1
    return {"id": raw["id"], "match": clause(raw["match"]), "prices": prices(raw["prices"], dropped)}


def provider(raw: dict[str, Any], dropped: dict[str, int]) -> dict[str, Any]:
    """One provider: id, name, its matching rules and its models, in order."""
    if raw.get("__type") != "Provider" or not set(raw) <= PROVIDER_FIELDS:
        raise ValueError(f"unknown provider fields {sorted(set(raw) - PROVIDER_FIELDS)}")
    out: dict[str, Any] = {"id": raw["id"], "name": raw["name"]}
    for field in ("provider_match", "model_match"):
        if raw.get(field) is not None:
            out[field] = clause(raw[field])
    if raw.get("fallback_model_providers"):
        out["fallback_model_providers"] = raw["fallback_model_providers"]
    out["models"] = [model(item, dropped) for item in raw.get("models", [])]
    return out


def newest_date(slim: list[dict[str, Any]]) -> str | None:
    """The latest start_date in the table: the newest price change it knows of (maybe announced)."""
    dates = [entry["constraint"]["start_date"] for p in slim for m in p["models"]
             if isinstance(m["prices"], list) for entry in m["prices"]
             if "start_date" in entry.get("constraint", {})]
    return max(dates, default=None)


# ---------------------------------------------------------------------------------------------------
# The wheel, and the files written.


def download(directory: Path, version: str | None) -> Path:
    """The newest genai-prices wheel (or the version asked for), from PyPI through pip."""
    requirement = f"{PACKAGE}=={version}" if version else PACKAGE
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "--only-binary", ":all:", "--no-cache-dir", "--dest", str(directory),
                    requirement], check=True)
    wheels = sorted(directory.glob("genai_prices-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"prices: expected one genai-prices wheel, found {[w.name for w in wheels]}")
    return wheels[0]


def wheel_files(wheel: Path) -> tuple[str, str, str]:
    """data.py, METADATA and LICENSE of the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        license_name = next(n for n in names
                            if ".dist-info/" in n and n.rsplit("/", 1)[-1].startswith("LICENSE"))
        return (archive.read(DATA_MODULE).decode(), archive.read(metadata).decode(),
                archive.read(license_name).decode())


def copyright_line(license_text: str) -> str:
    """The license's "Copyright (c) ..." line."""
    lines = (line.strip() for line in license_text.splitlines())
    return next((line for line in lines if line.lower().startswith("copyright")), "")


def build(wheel: Path, today: dt.date) -> tuple[dict[str, Any], str]:
    """prices.json's content and the license text, from one wheel."""
    data, metadata_text, license_text = wheel_files(wheel)
    metadata = email.parser.Parser().parsestr(metadata_text)
    dropped: dict[str, int] = {}
    slim = [provider(raw, dropped) for raw in read_providers(data)]
    version = metadata["Version"]
    header = {
        "source": PACKAGE,
        "version": version,
        "url": UPSTREAM,
        "pypi": f"https://pypi.org/project/{PACKAGE}/{version}/",
        "file": f"{wheel.name}:{DATA_MODULE}",
        "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "data_version": version,        # the data carries no version or date of its own: the release's
        "newest_start_date": newest_date(slim),     # may lie ahead: announced price changes
        "vendored": today.isoformat(),
        "license": metadata.get("License-Expression") or metadata.get("License") or "",
        "copyright": copyright_line(license_text),
        "license_file": "prices.LICENSE",
        "currency": "USD",
        "units": UNITS,
        "left_out": dict(sorted(dropped.items())),   # price entries (and models' variants) not vendored
        "semantics": ("genai-prices' own: provider by id, else the first provider_match; model by the "
                      "first match clause in the provider's order (ref lower-cased; then compact dates "
                      "-YYYYMMDD as -YYYY-MM-DD), else in fallback_model_providers; prices: the last list "
                      "entry whose constraint holds (else the first); input tokens include cache reads and "
                      "writes, which are taken out of input only where the model prices them; a tier "
                      "applies to all tokens of its unit once total input tokens exceed its start; "
                      "requests_kcount counts 1 request per call."),
        "layout": "a line per provider (its models last) and per model",
    }
    return {"header": header, "providers": slim}, license_text


def write(out: Path, table: dict[str, Any], license_text: str) -> Path:
    """prices.json, compact with a line per provider and per model (readable diffs, and otrace can
    leave the providers it never meets unparsed), and prices.LICENSE."""
    def compact(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    blocks = []
    for entry in table["providers"]:
        fields = compact({key: value for key, value in entry.items() if key != "models"})
        models = "".join(f"{compact(item)},\n" for item in entry["models"])[:-2]
        blocks.append(f'{fields[:-1]},"models":[\n' + (f"{models}\n" if models else "") + "]}")
    text = f'{{"header":{compact(table["header"])},\n"providers":[\n' + ",\n".join(blocks) + "\n]}\n"
    if json.loads(text) != table:
        raise ValueError("prices.json does not read back as written")
    target = out / "prices.json"
    for path, content in ((target, text), (out / "prices.LICENSE", license_text)):
        partial = path.with_suffix(".partial")
        partial.write_text(content, encoding="utf-8")
        partial.replace(path)               # never half a table beside otrace
    return target


def pin(version: str) -> None:
    """Pin requirements-dev.txt's genai-prices to the table's release: the tests check otrace's matcher
    against that release's own calc_price, which must be the table's."""
    path = ROOT / "requirements-dev.txt"
    lines = path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(f"{PACKAGE}=="):
            old = line.split()[0]
            lines[i] = line.replace(old, f"{PACKAGE}=={version}", 1)
    path.write_text("".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--wheel", type=Path, help="a genai-prices wheel already downloaded (no network)")
    parser.add_argument("--version", help="this genai-prices release rather than the newest")
    parser.add_argument("--out", type=Path, default=ROOT,
                        help="where prices.json and prices.LICENSE go (default: beside otrace.py)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="otrace-prices-") as tmp:
        wheel = args.wheel or download(Path(tmp), args.version)
        table, license_text = build(wheel, dt.datetime.now(dt.UTC).date())
        target = write(args.out, table, license_text)
    header = table["header"]
    if args.out == ROOT:
        pin(header["version"])
    models = sum(len(p["models"]) for p in table["providers"])
    print(f"prices: {header['source']} {header['version']} ({header['license']}): {len(table['providers'])} "
          f"providers, {models} models, {target.stat().st_size:,} bytes in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
