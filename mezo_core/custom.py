"""``mezo-run init custom FILE task.train=... task.dev=...``: a recipe for a user's own
data, sized from the data itself. The packaged SST-2 recipe samples 16 examples per
class and 200 validation rows from a 67k-row file; on a file of a few hundred rows
those numbers fail or leave nothing to select on."""
from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import OmegaConf

from .errors import MezoError
from .selection import MAX_GATE_FLOOR, plan

#: validation rows: a quarter of the train file, at most this many (enough for the sign
#: test to see a 2-point gain at the recipe's evaluation count)
MAX_VAL = 500
#: fewer validation rows than this select nothing useful: the run keeps its last adapter
MIN_VAL = 20
#: rows per step: the recipe's 16, fewer on a small training set (a batch never repeats a row)
BATCH = 16


def size(cfg) -> dict:
    """The sized fields (dotted key -> value) and why, for the data ``cfg.task`` names.
    The same sampling code as a run (``mezo_core.data``) decides what is left for
    validation, so the recipe it writes runs as written."""
    from .data import Overlap, label_names, read_records, sample, verbalizer_words
    t = cfg.task
    if t.hf_dataset is not None:
        raise MezoError("init custom: sizes data files (task.train, task.dev); with task.hf_dataset "
                        "start from `mezo-run init sst2` and set the sizes yourself")
    labels = label_names(t.verbalizer) or len(verbalizer_words(t.verbalizer))
    train = read_records(t.train, t.kind, labels, "task.train")
    read_records(t.dev, t.kind, labels, "task.dev")  # checked now, not after the model loads
    rows = len(train)
    val_file = bool(t.val)
    n_val = 0 if val_file else min(MAX_VAL, rows // 4)
    n_train = rows - n_val
    if n_val:  # what a run would find beyond its training sample, overlap rule included
        chosen = {id(r) for r in sample(train, None, n_train, t.sample_seed)}
        pool = [r for r in train if id(r) not in chosen]
        if t.val_overlap_words:
            overlaps = Overlap([r.text for r in train if id(r) in chosen], t.val_overlap_words)
            pool = [r for r in pool if not overlaps(r.text)]
        n_val = len(pool) if len(pool) < n_val else n_val
        if n_val < MIN_VAL:
            n_val = 0
    if n_val == 0 and not val_file:
        n_train = rows
    batch = max(1, min(BATCH, n_train // 2))
    steps = 500
    select = val_file or n_val > 0
    sized = {"task.k_per_class": None, "task.n_train": n_train, "task.n_val": n_val,
             "mezo.batch_size": batch, "mezo.steps": steps, "eval_every": 100 if select else 0,
             "checkpoint_every": 100, "selection.load_best_at_end": select}
    why = [f"{rows} train rows: {n_train} to train on"
           + (f", {n_val} held out for validation (best/ selects on them; dev is only reported)" if n_val else "")
           + (", validation from task.val" if val_file else "")]
    if not select:
        why.append(f"too few rows for a validation set of >= {MIN_VAL}: no selection, the run's result is "
                   f"its last adapter (add rows, or a validation file: task.val)")
    else:
        probe = OmegaConf.merge(cfg, OmegaConf.create({"mezo": {"steps": steps}, "eval_every": 100}))
        rule = plan(probe, n_val or MAX_VAL, "val")
        if rule["rule"] != "sign_test" and n_val:
            why.append(f"{n_val} validation rows are too few for the significance test at "
                       f"{rule['first_move_level']:.3g} (its floor is {100 * MAX_GATE_FLOOR:.0f} points): "
                       f"best/ takes the best validation score")
    why.append(f"batch {batch}, {steps} steps, an evaluation every 100")
    return {"fields": sized, "why": why}


def write_recipe(base: Path, cfg, overrides: list[str], out: Path) -> dict:
    """The packaged recipe ``base`` with the user's overrides and the sized fields,
    written to ``out`` with a header that says how it was sized."""
    sized = size(cfg)
    data = yaml.safe_load(base.read_text(encoding="utf-8")) or {}
    given = [item.partition("=")[0].strip() for item in overrides]
    if "out_dir" not in given:
        data["out_dir"] = f"runs/{out.stem}"
    for key in given + list(sized["fields"]):
        value = sized["fields"][key] if key in sized["fields"] else OmegaConf.select(cfg, key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        node, *path, leaf = [data] + key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    header = ["# mezo-run init custom: the sst2 recipe sized for this data (mezo-run train -c THIS_FILE)"]
    header += [f"#   {line}" for line in sized["why"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + "\n" + yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True),
                   encoding="utf-8")
    return sized


class _Dumper(yaml.SafeDumper):
    """Strings with a newline or tab in double quotes, escapes visible (as the recipes write them)."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style='"' if ("\n" in text or "\t" in text) else None))
