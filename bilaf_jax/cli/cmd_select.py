"""`bilaf select`: choose samples to label from a feature file; write a JSON list + provenance.

    bilaf select FEATURES --budget B [--cores K] [--method bilaf] [--mode paper|official]
                 [--seed S] [--label-column] [--labeled FILE] [--mesh N|all] [--distributed]
                 --out SELECTION.json
    bilaf select --verify SELECTION.json [--mesh N|all]

The selection is a plain JSON list of pool indices (what the authors' finetuning code reads).
Beside it, `SELECTION.meta.json` records how it was made (method, every hyperparameter, seed,
feature-file sha256, versions, device, timings); `--verify` re-runs from that record and
confirms the same indices.

`--mesh` shards the pool's rows over devices; `--distributed` runs one selection across several
processes (start the same command on each; see `bilaf_jax.sharding`). Either gives the indices
of a one-device run (but where an exact tie is decided by a sum over rows, which the devices
add in another order: see `bilaf_jax.sharding`).
"""

from __future__ import annotations

import contextlib
import decimal
import json
import math
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

from bilaf_jax.cli import DefaultsFormatter, UsageError, add_mesh_options, seed_type, setup_mesh
from bilaf_jax.cli.cmd_run import add_compile_cache_option, enable_compile_cache
from bilaf_jax.distances import PRECISIONS
from bilaf_jax.io import selection_record_path as meta_path

METHODS = ("bilaf", "activeft", "kcenter", "kmeans", "random")
SELECTION_KEYS = ("method", "core_method", "mode", "budget", "num_cores", "seed", "label_column",
                  "labeled", "num_steps", "batch_size", "temperature", "learning_rate", "balance",
                  "num_neighbors", "ring_fraction", "remove_fraction", "opponent_penalty", "normalize")


def register(sub) -> None:
    p = sub.add_parser("select", help="select samples to label from a feature file",
                       description=__doc__.split("\n\n")[0],
                       formatter_class=DefaultsFormatter)
    p.add_argument("features", nargs="?", help=".npy [n, d] or .npz with 'features'")
    p.add_argument("--budget", help="number of samples B, or a percentage of the pool such as 1%% "
                   "(rounded down, at least 1; required unless --verify)")
    p.add_argument("--cores", type=int, default=None, dest="num_cores",
                   help="core samples K for --method bilaf (default: max(1, B // 10))")
    p.add_argument("--method", default="bilaf", help="|".join(METHODS))
    p.add_argument("--core-method", default="activeft", help="core stage for bilaf: activeft|kcenter|kmeans|random")
    p.add_argument("--mode", default="paper", help="boundary stage: paper (equations) | official (authors' code)")
    p.add_argument("--seed", type=seed_type, default=0,
                   help="seed of the selection's random key (ActiveFT's initialisation, k-center's "
                   "first point, k-means' seeding, random)")
    p.add_argument("--label-column", action="store_true",
                   help="the file is the authors' [n, d + 1] layout: its last column holds "
                   "class ids, dropped before selecting (labels never guide the selection)")
    p.add_argument("--labeled", default=None, metavar="FILE",
                   help="JSON list of already-labelled indices: never selected; existing cores in bilaf")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="similarity matmuls of ActiveFT and the boundary assignment (paper mode); "
                   "tensorfloat32 and bfloat16 accumulate in float32, are faster on accelerators and may flip "
                   "near-ties (tensorfloat32: NVIDIA GPUs only)")
    g = p.add_argument_group("ActiveFT")
    g.add_argument("--steps", type=int, default=300, dest="num_steps", help="Adam steps")
    g.add_argument("--batch-size", type=int, default=None,
                   help="random rows per step (ImageNet: 100000; default: every row)")
    g.add_argument("--temperature", type=float, default=0.07, help="tau of the similarities")
    g.add_argument("--lr", type=float, default=1e-3, dest="learning_rate", help="Adam learning rate")
    g.add_argument("--balance", type=float, default=1.0,
                   help="lambda, weight of the diversity term in the loss")
    g = p.add_argument_group("boundary stage")
    g.add_argument("--num-neighbors", type=int, default=10,
                   help="k of the density distance (Eq. 3)")
    g.add_argument("--ring-fraction", type=float, default=0.1,
                   help="P_in, ring size as a share of the pseudo-class")
    g.add_argument("--remove-fraction", type=float, default=0.1,
                   help="P_rm, share of each pseudo-class dropped by denoising")
    g.add_argument("--opponent-penalty", type=float, default=1.1,
                   help="delta, penalty factor per pick facing the same opponent")
    g.add_argument("--normalize", action="store_true", help="L2-normalise features in the boundary stage")
    g.add_argument("--unique", action="store_true",
                   help="keep only the first occurrence of each index (official mode repeats "
                   "samples where the authors' allocation exceeds a class, as their script; "
                   "`bilaf finetune` needs unique indices)")
    p.add_argument("--out", help="where to write the JSON list of indices (required unless --verify)")
    p.add_argument("--verify", metavar="SELECTION", help="re-run the selection recorded beside SELECTION and compare")
    # The selection's own options, dest -> (flag, default), to tell which were given: --verify
    # takes them all from its record and a method ignores some (both are refused when given;
    # the device options added below may change).
    selection_flags = {a.dest: (a.option_strings[0] if a.option_strings else a.dest.upper(), a.default)
                       for a in p._actions if a.dest not in ("help", "verify")}
    add_mesh_options(p)
    add_compile_cache_option(p, "so that a later call on the same pool (any budget) skips "
                             "compiling")
    p.set_defaults(func=run, _selection_flags=selection_flags)


def parse_budget(text, n: int) -> int:
    """'500' or '1%' (of the pool, at least 1) -> a budget in [1, n].

    Exact in decimal: floats round "30.0000000000000001" to 30, and Fractions of "1e-999999999"
    take minutes to build; Decimals compare any exponent at once."""
    if text is None:
        raise UsageError("--budget is required")
    text = str(text).strip()
    number = text[:-1] if text.endswith("%") else text
    try:
        exact = decimal.Decimal(number)
    except decimal.InvalidOperation:
        exact = None
    if exact is None or not exact.is_finite():
        raise UsageError(f"--budget must be an integer or a percentage like 1%, got {text!r}")
    if text.endswith("%"):
        if not 0 < exact <= 100:
            raise UsageError(f"--budget percentage must be in (0, 100], got {text}")
        # floor(n * p / 100) without rounding: "29%" of 100 is 29, not 28.999...
        with decimal.localcontext() as ctx:
            ctx.prec = len(str(n)) + len(exact.as_tuple().digits) + 3  # enough for the product
            ctx.Emin, ctx.Emax = decimal.MIN_EMIN, decimal.MAX_EMAX
            share = (exact * n).scaleb(-2).to_integral_value(rounding=decimal.ROUND_FLOOR)
        return max(1, int(share))
    if exact != exact.to_integral_value():
        raise UsageError(f"--budget must be an integer, got {text}")
    if not 1 <= exact <= n:
        raise UsageError(f"--budget must be in [1, {n}] for this pool, got {text}")
    return int(exact)


# Settings only some methods read: given to another, they would be ignored and yet recorded.
_BILAF_ONLY = ("core_method", "mode", "num_neighbors", "ring_fraction", "remove_fraction",
               "opponent_penalty", "normalize", "unique")
_ACTIVEFT_ONLY = ("num_steps", "batch_size", "temperature", "learning_rate", "balance")


def _refuse_unused(a) -> None:
    flags = getattr(a, "_selection_flags", {})  # dest -> (flag, default)

    def given(names):
        return [flags[d][0] for d in names if d in flags and getattr(a, d) != flags[d][1]]

    def verb(names):
        return "apply" if len(names) > 1 else "applies"

    if a.method != "bilaf" and (unused := given(_BILAF_ONLY)):
        raise UsageError(f"{', '.join(unused)} {verb(unused)} to --method bilaf only")
    core = a.core_method if a.method == "bilaf" else a.method
    if core != "activeft" and (unused := given(_ACTIVEFT_ONLY)):
        where = f"--core-method {core}" if a.method == "bilaf" else f"--method {core}"
        raise UsageError(f"{', '.join(unused)} {verb(unused)} to ActiveFT only, which {where} "
                         "does not run")


def _check_args(a) -> None:
    if a.method not in METHODS:
        raise UsageError(f"unknown --method {a.method!r}; expected one of {', '.join(METHODS)}")
    if a.core_method not in METHODS[1:]:
        raise UsageError(f"unknown --core-method {a.core_method!r}; expected one of {', '.join(METHODS[1:])}")
    if a.mode not in ("paper", "official"):
        raise UsageError(f"unknown --mode {a.mode!r}; expected paper or official")
    if a.num_cores is not None and a.method != "bilaf":
        raise UsageError("--cores applies to --method bilaf only")
    _refuse_unused(a)
    if a.num_steps < 0:
        raise UsageError(f"--steps must be >= 0, got {a.num_steps}")
    for flag, v in (("temperature", a.temperature), ("balance", a.balance),
                    ("opponent-penalty", a.opponent_penalty)):
        if not 0 < v < math.inf:
            raise UsageError(f"--{flag} must be finite and > 0, got {v}")
    if not 0 <= a.learning_rate < math.inf:
        raise UsageError(f"--lr must be finite and >= 0, got {a.learning_rate}")
    if a.num_neighbors < 1:
        raise UsageError(f"--num-neighbors must be >= 1, got {a.num_neighbors}")
    if not 0 < a.ring_fraction <= 1:
        raise UsageError(f"--ring-fraction must be in (0, 1], got {a.ring_fraction}")
    if not 0 <= a.remove_fraction <= 1:
        raise UsageError(f"--remove-fraction must be in [0, 1], got {a.remove_fraction}")
    if a.precision != "float32" and a.method == "bilaf" and a.mode == "official":
        raise UsageError("--precision applies to --mode paper only (official mode is float64)")


def _check_against_pool(a, budget: int, n: int, labeled) -> None:
    """The checks that need the pool and the budget, here so that their messages name the
    flags (the library's messages name its parameters: num_cores, batch_size, exclude)."""
    if a.num_cores is not None and not 1 <= a.num_cores <= budget:
        raise UsageError(f"--cores must be in [1, {budget}] (at most the budget), got {a.num_cores}")
    if a.batch_size is not None and not 1 <= a.batch_size <= n:
        raise UsageError(f"--batch-size must be in [1, {n}] (the pool's rows), got {a.batch_size}")
    if labeled is None:
        return
    if a.method == "bilaf" and a.mode == "official":
        raise UsageError("--labeled needs --mode paper: the authors' script (official mode) has "
                         "no notion of an already-labelled pool")
    if budget > n - len(labeled):
        given = str(a.budget).strip()
        given += f" ({budget} samples)" if given.endswith("%") else ""
        raise UsageError(f"--budget {given} exceeds the {n - len(labeled)} rows of the pool "
                         "that --labeled leaves")


def _selection_settings(a, n: int) -> dict:
    return {
        "method": a.method, "core_method": a.core_method, "mode": a.mode,
        "budget": parse_budget(a.budget, n), "num_cores": a.num_cores, "seed": a.seed,
        "label_column": a.label_column,
        "labeled": str(Path(a.labeled).resolve()) if a.labeled else None, "num_steps": a.num_steps,
        "batch_size": a.batch_size, "temperature": a.temperature, "learning_rate": a.learning_rate,
        "balance": a.balance, "num_neighbors": a.num_neighbors, "ring_fraction": a.ring_fraction,
        "remove_fraction": a.remove_fraction, "opponent_penalty": a.opponent_penalty,
        "normalize": a.normalize, "precision": a.precision, "unique": a.unique,
    }


def run_selection(features, settings: dict, labeled=None, mesh=None):
    """Run `bilaf_jax.select` with CLI settings, on one device or row-sharded over `mesh`.
    Returns (indices list, timings, num_cores used, waiver): waiver is None unless paper mode
    waived denoising, then (samples P_rm keeps, samples the boundary stage picks)."""
    import jax
    import numpy as np

    from bilaf_jax.pipeline import default_num_cores
    from bilaf_jax.sharding import place

    budget = settings["budget"]
    core_options = {}
    core = settings["method"] if settings["method"] != "bilaf" else settings["core_method"]
    if core == "activeft":  # the only selector with optimiser settings
        core_options = dict(num_steps=settings["num_steps"], batch_size=settings["batch_size"],
                            temperature=settings["temperature"], learning_rate=settings["learning_rate"],
                            balance=settings["balance"])
    num_cores = settings["num_cores"]
    if settings["method"] == "bilaf" and num_cores is None:
        num_cores = default_num_cores(budget)
    start = time.perf_counter()
    # Official mode computes in float64, from the host array without a mesh: placed with x64
    # off, float64 features would reach it in float32, and it could pick other samples.
    official = settings["method"] == "bilaf" and settings["mode"] == "official"
    with jax.enable_x64(True) if official and features.dtype == np.float64 else contextlib.nullcontext():
        features, num_rows = place(features, mesh)
    with warnings.catch_warnings():  # repeats are reported by `run`, in one line
        warnings.filterwarnings("ignore", message="official mode: the authors' allocation")
        out = _select(features, budget, settings, num_cores, core_options, labeled, num_rows)
    indices = np.asarray(jax.block_until_ready(out.indices)).tolist()
    if settings.get("unique"):  # records older than --unique lack it
        indices = list(dict.fromkeys(indices))
    timings = {"total_seconds": round(time.perf_counter() - start, 4)}
    return indices, timings, num_cores, _denoising_waiver(out.boundary, settings)


def _denoising_waiver(boundary, settings):
    """(kept, picks) where paper mode waived denoising because the samples P_rm keeps number
    fewer than its picks, else None."""
    import numpy as np

    if boundary is None or settings["mode"] != "paper" or settings["remove_fraction"] == 0:
        return None
    # A waived stage reports every sample as kept (its candidates are the whole classes).
    # With P_rm > 0 denoising drops a sample from every class of two or more, so all kept
    # means a waiver, unless every class is its core alone (nothing to drop).
    kept = np.asarray(boundary.kept)
    num_classes = np.asarray(boundary.allocation).size
    if not kept.all() or kept.size == num_classes:
        return None
    # What P_rm keeps (Algorithm 1): max(1, floor(m (1 - P_rm))) of a class of m, exact for
    # the decimal P_rm prints as.
    sizes = np.bincount(np.asarray(boundary.pseudo_labels), minlength=num_classes)
    p_rm = Fraction(repr(float(settings["remove_fraction"])))
    keeps = [max(1, m - math.ceil(m * p_rm)) for m in sizes.tolist() if m > 0]
    return sum(keeps), int(np.asarray(boundary.indices).size)


def _select(features, budget, settings, num_cores, core_options, labeled, num_rows):
    import jax

    from bilaf_jax.pipeline import select

    return select(jax.random.key(settings["seed"]), features, budget, method=settings["method"],
                 num_cores=num_cores, core_method=settings["core_method"], mode=settings["mode"],
                 core_options=core_options, num_neighbors=settings["num_neighbors"],
                 ring_fraction=settings["ring_fraction"], remove_fraction=settings["remove_fraction"],
                 opponent_penalty=settings["opponent_penalty"], normalize=settings["normalize"],
                 labeled=labeled, num_rows=num_rows,
                 precision=settings.get("precision", "float32"))  # records older than --precision lack it


def run(a) -> int:
    if not a.verify:
        if not a.features:
            raise UsageError("FEATURES is required (or use --verify SELECTION.json)")
        if not a.out:
            raise UsageError("--out is required")
        _check_args(a)
    if a.verify:
        given = [flag for dest, (flag, default) in getattr(a, "_selection_flags", {}).items()
                 if getattr(a, dest, default) != default]
        if given:
            raise UsageError(f"--verify re-runs the selection its record describes; it takes no "
                             f"{', '.join(given)} (only the device options)")
    mesh = setup_mesh(a)
    enable_compile_cache(a.compile_cache)
    if a.verify:
        return verify(a.verify, mesh)
    from bilaf_jax import io
    from bilaf_jax.sharding import is_main_process

    inputs = (a.features, a.labeled)
    out_path = io.check_output_path(a.out, inputs=inputs)
    if not out_path.name.endswith(".json"):
        # NAME and NAME.json would share the record NAME.meta.json.
        raise UsageError(f"--out must name a .json file (its record goes beside it as "
                         f"NAME.meta.json), got {a.out}")
    io.check_output_path(meta_path(out_path), inputs=inputs)
    _refuse_foreign_output(out_path)

    # The record describes the bytes selected on: hashed as they are read, not after the
    # (long) selection, when a file replaced meanwhile would be recorded instead.
    def read_features():
        from bilaf_jax.extract import pool_identity

        loaded, _ = io.load_features(a.features, label_column=a.label_column)
        return loaded, pool_identity(a.features)  # which images the rows are

    (features, pool), digest = _read_hashed(a.features, read_features)
    n, d = features.shape
    settings = _selection_settings(a, n)
    if a.method == "bilaf" and settings["num_neighbors"] > n:
        # A pseudo-class has at most n members, and the density averages over
        # min(k, members): any larger k selects the same; record the k that takes effect.
        sys.stderr.write(f"bilaf select: note: --num-neighbors {a.num_neighbors} exceeds the "
                         f"pool's {n} rows; {n} takes effect and is recorded\n")
        settings["num_neighbors"] = n
    labeled = labeled_digest = None
    if a.labeled:
        # [] is the first round of a labelling loop: nothing labelled yet, as without it.
        labeled, labeled_digest = _read_hashed(
            a.labeled, lambda: io.load_index_list(a.labeled, n, name="--labeled", allow_empty=True))
        labeled = labeled or None
    _check_against_pool(a, settings["budget"], n, labeled)
    indices, timings, num_cores, waiver = run_selection(features, settings, labeled, mesh)
    settings["num_cores"] = num_cores
    if not is_main_process():  # every process holds the same indices; one writes them
        return 0
    meta = _provenance(a.features, features, digest, pool, settings, timings, len(indices), mesh)
    meta["indices_sha256"] = io.indices_sha256(indices)  # ties the record to this very list
    if a.method == "bilaf" and a.mode == "paper":
        meta["denoising_waived"] = waiver is not None
    if a.labeled:  # so that --verify can tell when the labelled list changed
        meta["labeled"] = {"path": str(Path(a.labeled).resolve()), "sha256": labeled_digest}
    # Sidecar first, list last: a list on disk always has its record beside it.
    io.write_json_atomic(meta_path(out_path), meta, indent=2)
    io.write_json_atomic(out_path, indices)
    sys.stderr.write(f"bilaf select: wrote {_count(len(indices))} to {out_path} "
                     f"({timings['total_seconds']:.2f} s)\n")
    if waiver is not None:
        kept, picks = waiver
        more = " (the budget plus the labelled rows)" if a.labeled else ""
        sys.stderr.write(f"bilaf select: note: denoising waived: --remove-fraction "
                         f"{a.remove_fraction} keeps {kept} samples, fewer than the {picks} to "
                         f"pick{more}, so every sample is a candidate, as with 0; lower "
                         "--remove-fraction or the budget to denoise\n")
    _note_repeats(indices, settings["budget"], a.unique)
    return 0


def _count(n: int) -> str:
    return f"{n} {'index' if n == 1 else 'indices'}"


def _note_repeats(indices, budget: int, deduplicated: bool) -> None:
    """One note where official mode repeated samples (only it does): a plain one where fewer
    than half the picks are distinct, which the authors' allocation can give."""
    unique = len(set(indices))
    if unique == budget:
        return
    why = "official mode repeats samples where the authors' allocation exceeds a class, as their script does"
    if 2 * unique < budget:
        what = (f"--unique kept only {unique} of the {budget} picks" if deduplicated else
                f"only {unique} of the {budget} picks are distinct")
        note = f"{what}: {why}; use --mode paper for {budget} distinct samples"
    elif deduplicated:
        note = f"--unique kept {unique} of the {budget} picks"
    else:
        note = f"{unique} unique of {budget}: {why}; `bilaf finetune` needs unique indices (--unique)"
    sys.stderr.write(f"bilaf select: note: {note}\n")


def _refuse_foreign_output(out_path: Path) -> None:
    """Refuse to replace files `bilaf select` did not write: --out may only be an earlier
    selection (a JSON list with its record beside it), its record only such a record."""
    record = meta_path(out_path)
    meta = _read_json(record)
    ours = isinstance(meta, dict) and isinstance(meta.get("selection"), dict) and "features" in meta
    if record.exists() and not ours:
        raise UsageError(f"{record} exists and is not a `bilaf select` record; move it away or "
                         "choose another --out")
    if not out_path.exists():
        return
    # The record is written before its list, so a `bilaf select` list always has one; a
    # run stopped between the two leaves a new record beside the old list, still ours.
    listed = _read_json(out_path)
    if not ours or not (isinstance(listed, list) and all(type(i) is int for i in listed)):
        why = (f"no record {record.name} beside it" if not ours else "not a JSON list of indices")
        raise UsageError(f"--out {out_path} exists and is not a `bilaf select` selection ({why}); "
                         "choose another --out or remove it")


def _read_json(path: Path):
    """The JSON in `path`, or None where it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _read_hashed(path, read):
    """(what `read()` returns, sha256 of `path`): the digest is of the bytes read, or
    UsageError where the file changed while it was read (replaced, or still being written)."""
    import os

    from bilaf_jax import io

    def state():
        try:
            st = os.stat(path)
        except OSError:  # read() says what is wrong with it
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    before = state()
    value = read()
    digest = io.sha256_file(path)
    if state() != before:
        raise UsageError(f"{path} changed while it was read; run again once it is complete")
    return value, digest


def _provenance(features_path, features, digest, pool, settings, timings, count,
                mesh=None) -> dict:
    import platform

    import jax

    import bilaf_jax

    device = jax.devices()[0]
    return {
        "selection": settings,
        "count": count,
        "features": {"path": str(Path(features_path).resolve()), "sha256": digest,
                     "n": int(features.shape[0]), "d": int(features.shape[1]), "dtype": str(features.dtype),
                     # which images the rows are (checked by `bilaf finetune`)
                     "pool": pool},
        "versions": {"bilaf_jax": bilaf_jax.__version__, "jax": jax.__version__,
                     "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else None,
                     "python": platform.python_version()},
        "device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count(),
                   "mesh": None if mesh is None else mesh.size, "processes": jax.process_count()},
        "timings": timings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _load_selection(path) -> list[int]:
    """The list to verify: as `io.load_index_list` reads a selection, but repeats are kept, as
    official mode writes them (where the authors' allocation exceeds a class)."""
    from bilaf_jax import io

    listed = _read_json(Path(path))
    if isinstance(listed, list) and listed and all(type(i) is int and i >= 0 for i in listed):
        return listed
    return io.load_index_list(path, name="selection")  # raises, naming what is wrong


# Types of the recorded settings `bilaf select` writes (None where the flag may be absent).
_RECORD_TYPES = {"method": (str,), "core_method": (str,), "mode": (str,), "budget": (int,),
                 "num_cores": (int, type(None)), "seed": (int,), "label_column": (bool,),
                 "labeled": (str, type(None)), "num_steps": (int,), "batch_size": (int, type(None)),
                 "temperature": (int, float), "learning_rate": (int, float), "balance": (int, float),
                 "num_neighbors": (int,), "ring_fraction": (int, float),
                 "remove_fraction": (int, float), "opponent_penalty": (int, float),
                 "normalize": (bool,), "precision": (str,), "unique": (bool,)}


def _check_recorded_settings(settings: dict, mpath) -> None:
    """Refuse a record (edited by hand) holding a setting the command would have refused: a
    string seed or a null temperature failed inside JAX, and a seed of 2**40 verified as the
    seed 0 that JAX keeps of it."""
    import argparse

    from bilaf_jax.cli import SEED_LIMIT

    def refuse(why):
        raise UsageError(f"provenance record {mpath} holds a setting `bilaf select` refuses: {why}")

    for key, types in _RECORD_TYPES.items():
        value = settings.get(key)
        if key in settings and (not isinstance(value, types) or
                                (isinstance(value, bool) and bool not in types)):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            refuse(f"{key} = {json.dumps(value)} (expected {expected})")
    if not 0 <= settings["seed"] < SEED_LIMIT:
        refuse(f"seed = {settings['seed']} (not in [0, 2**32))")
    # The command line's own checks (records older than --precision lack it: float32).
    try:
        _check_args(argparse.Namespace(**{"precision": "float32", **settings}))
    except UsageError as e:
        refuse(str(e))


def verify(selection_path, mesh=None) -> int:
    """Re-run a recorded selection (on `mesh`, if given); exit 0 when the indices agree, 1 when
    they differ."""
    from bilaf_jax import io
    from bilaf_jax.sharding import is_main_process

    selection = _load_selection(selection_path)
    mpath = meta_path(selection_path)
    if not mpath.exists():
        raise UsageError(f"no provenance record beside the selection: {mpath}")
    try:
        meta = json.loads(mpath.read_text())
        settings = meta["selection"]
        fpath, fdigest = str(meta["features"]["path"]), str(meta["features"]["sha256"])
        missing = [k for k in SELECTION_KEYS if k not in settings]
        recorded_labeled = meta.get("labeled")  # absent in records made before it was kept
        if recorded_labeled is not None:
            recorded_labeled = (str(recorded_labeled["path"]), str(recorded_labeled["sha256"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"provenance record {mpath} is unreadable: "
                         f"{type(e).__name__} {e}") from None
    if missing:
        raise UsageError(f"provenance record {mpath} lacks {', '.join(missing)}")
    _check_recorded_settings(settings, mpath)
    recorded = meta.get("indices_sha256")  # absent in records made before it was kept
    if recorded is not None and recorded != io.indices_sha256(selection):
        # The sidecar is written first: a run killed between the two writes, or an edited
        # list, leaves a list its record does not describe.
        raise UsageError(f"{selection_path} is not the list its record {mpath.name} describes "
                         "(edited, or its run stopped before writing it); select again")
    if not Path(fpath).exists():
        raise UsageError(f"the recorded features file is gone: {fpath}")
    if io.sha256_file(fpath) != fdigest:
        raise UsageError(f"features file {fpath} changed since the selection was made (sha256 differs)")
    features, _ = io.load_features(fpath, label_column=settings["label_column"])
    labeled = None
    if settings["labeled"]:
        lpath = recorded_labeled[0] if recorded_labeled else settings["labeled"]
        if recorded_labeled and Path(lpath).is_file() and io.sha256_file(lpath) != recorded_labeled[1]:
            raise UsageError(f"--labeled file {lpath} changed since the selection was made "
                             "(sha256 differs)")
        labeled = io.load_index_list(lpath, features.shape[0], name="--labeled",
                                     allow_empty=True) or None
    indices, timings, *_ = run_selection(features, settings, labeled, mesh)
    if not is_main_process():
        return 0 if indices == selection else 1
    if indices == selection:
        print(f"verified: {_count(len(indices))} identical ({timings['total_seconds']:.2f} s)")
        return 0
    same = len(set(indices) & set(selection))
    print(f"MISMATCH: re-run gives {_count(len(indices))}, {same} shared with the {len(selection)} on file"
          f"{' (same set, different order)' if same == len(selection) == len(indices) else ''}")
    return 1
