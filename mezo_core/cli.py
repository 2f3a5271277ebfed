"""``mezo-run``: train, eval, list backends, show the resolved config.

    mezo-run train [-c RECIPE.yaml] [--resume] [key=value ...]   (default: the packaged sst2 recipe)
    mezo-run eval  [-c ...] [--adapter DIR] [--predictions FILE] [key=value ...]
    mezo-run backends
    mezo-run config [-c ...] [key=value ...]
    mezo-run init [RECIPE] [PATH] | init --list   (an editable copy of a packaged recipe)
    mezo-run init custom PATH task.train=FILE task.dev=FILE ...   (sized for your data)
    mezo-run export --merge OUT [-c ...] [--adapter DIR] [key=value ...]

Benchmarks live in the repository, not in the package: ``python -m benchmarks list``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import DEFAULT_CONFIG, DEFAULT_RECIPE, default_config, load_config, recipes, validate
from .distributed import init_from_env, rank_and_world
from .errors import DivergedError, MezoError
from .registry import Registry, make_plugin_manager
from .threads import usable_cores


def make_backend(cfg, registry):
    """The configured backend, built with what it needs: the config and the registry."""
    cls = registry.get("backends", cfg.backend)
    reason = cls.unavailable_reason()
    if reason:
        raise MezoError(f"backend {cfg.backend!r} is unavailable: {reason}")
    return cls(cfg, registry)


def check_out_dir(path) -> None:
    """Create the run folder and write into it now, not after minutes of model
    loading; folders made for the test are removed (a failed run writes nothing)."""
    out = Path(path)
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise MezoError(f"config field 'out_dir': cannot create or write the folder {out}: {exc.strerror}") from None
    finally:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                pass


def adapter_lora(cfg, adapter) -> None:
    """Take r, alpha, target modules and layers from the adapter's own
    adapter_config.json: eval must build the adapter it was trained with, whatever
    the config says now. A folder without one (full-parameter weights) is left as is."""
    path = Path(adapter)
    if not path.is_dir():
        raise MezoError(f"--adapter: {path} is not a folder")
    conf = path / "adapter_config.json"
    if not conf.exists():
        return
    from .adapter import read_lora_config
    lora = read_lora_config(conf)   # each field checked, one line naming the file and the field
    try:
        cfg.merge_with({"lora": lora})
        validate(cfg)
    except (MezoError, ValueError, TypeError, OmegaConfBaseException) as exc:
        raise MezoError(f"--adapter: cannot use {conf}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None


def cmd_train(args, cfg, registry):
    from .trainer import Trainer
    if rank_and_world()[0] == 0:  # rank 0 alone writes the run folder
        check_out_dir(cfg.out_dir)
    backend = make_backend(cfg, registry)
    try:
        summary = Trainer(cfg, backend, registry).train(resume=args.resume)
    finally:
        backend.close()
    _print_summary(summary, cfg)


def cmd_eval(args, cfg, registry):
    from .data import Task
    if args.adapter:
        adapter_lora(cfg, args.adapter)
    backend = make_backend(cfg, registry)
    try:
        if args.adapter:
            backend.load_adapter(args.adapter)
        # eval scores dev alone: the training and validation sampling (sized for a run) is off
        only_dev = OmegaConf.merge(cfg.task, {"k_per_class": None, "n_train": None, "n_val": 0, "val": None,
                                              "val_overlap_words": 0})
        task = Task(only_dev, backend.tokenizer)
        from tqdm.auto import tqdm
        with tqdm(total=len(task.dev), desc="eval (dev)", dynamic_ncols=True, disable=not cfg.progress,
                  file=sys.stderr) as bar:
            rows = [] if args.predictions else None
            result = task.evaluate(backend, cfg.eval_batch_size, bar, predictions=rows)
            result.pop("dev_outcomes", None)
        if rows is not None:
            out = Path(args.predictions)
            tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")   # complete or absent, never a part
            from .runfiles import writing
            with writing(out, cleanup=tmp):   # a full disk: one line naming the file, no part left
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, out)
            result["predictions"] = str(args.predictions)
        if cfg.task.max_tokens:
            result["truncated_examples"] = task.truncated
    finally:
        backend.close()
    print(json.dumps(result, indent=1))


def _print_summary(summary, cfg):
    """Zero-shot, the last adapter and best/, each with its step and figures; the run's
    result (adapter/) marked. Nothing trained is hidden behind the selection."""
    zero, final, best = summary.get("zero_shot") or {}, summary.get("final") or {}, summary.get("best")
    key = next(k for k in ("dev_accuracy", "dev_reward", "dev_exact_match", "dev_loss") if k in final)
    val = key.replace("dev_", "val_")
    print(f"\nDev {key.replace('dev_', '')} ({final.get('dev_examples')} examples of {cfg.task.dev}) "
          f"after {summary['step']} MeZO steps ({cfg.backend} backend):")

    def line(label, figures, where=""):
        extra = f"  (validation {figures[val]:.4f})" if val in figures else ""
        print(f"  {label:<20}: {figures[key]:.4f}{extra}{where}")
    if zero:
        line("zero-shot", zero)
    result = (summary.get("result") or {}).get("adapter", "last")
    line(f"last (step {summary['step']})", final, "  last/" + (", adapter/" if result == "last" else ""))
    if best:
        line(f"best (step {best['step']})", best, "  best/" + (", adapter/" if result == "best" else ""))
        plan = summary.get("selection") or {}
        rule = ("sign test" if plan.get("rule") == "sign_test" else "best score")
        print(f"  {'':<20}  best/: selected on {plan.get('examples')} {plan.get('split')} examples by {rule}")
    if key == "dev_exact_match":
        print(f"  dev loss            : {zero.get('dev_loss', float('nan')):.4f} -> {final['dev_loss']:.4f}")
    guard = summary.get("guard") or {}
    if guard.get("events"):
        print(f"  guard               : {guard['events']} event(s), {guard['roll_backs']} roll-back(s), "
              f"step size x{guard['lr_scale']:.3g} (metrics.jsonl rows with 'guard')")
    if summary.get("stopped_early"):
        print(f"  stopped early at step {summary['stopped_early']} (selection.early_stop_patience)")
    print(f"  run folder: {cfg.out_dir} (metrics.jsonl, training.png, adapter/ = {result}/)")


def set_threads(cfg) -> None:
    """torch's intra-op threads: ``threads`` when set; else, unless OMP_NUM_THREADS
    is, at most the cores this process may run on (CPU affinity and cgroup quota --
    torch counts the machine's cores, and more threads than cores is far slower).
    On a machine shared with other busy jobs, ``threads=1`` can be several times faster."""
    import torch
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, min(torch.get_num_threads(), usable_cores())))


def _unavailable(obj):
    return getattr(obj, "unavailable_reason", lambda: None)()


def cmd_backends(args, cfg, registry):
    print(f"{'backend':10} {'status':12} {'distribution':22} {'version':8} capabilities")
    for name, entry in sorted(registry.items["backends"].items()):
        reason = entry.obj.unavailable_reason()
        status = "available" if reason is None else "unavailable"
        print(f"{name:10} {status:12} {entry.distribution:22} {entry.version:8} "
              f"{', '.join(entry.obj.capabilities)}")
        if reason:
            print(f"{'':10} -> {reason}")
    for kind in [k for k in ("estimators", "rewards", "epsilon_schedules", "eviction_policies", "loggers")
                 if k in registry.items]:
        items = registry.items[kind]
        print(f"{kind.replace('_', ' ')}: " + ", ".join(
            f"{n} ({e.distribution}{', unavailable' if _unavailable(e.obj) else ''})"
            for n, e in sorted(items.items())))
    print("plugins (every one loaded, hook-only ones too):")
    for name, plugin, dist, hooks in registry.plugins():
        print(f"  {name:22} {dist:30} {', '.join(hooks)}")


def cmd_config(args, cfg, registry):
    if args.reference:  # every field, its default and meaning (the README's table)
        from .config_reference import markdown
        print(markdown(registry))
        return
    print(OmegaConf.to_yaml(cfg))


def cmd_init(args) -> None:
    """Copy a packaged recipe to an editable file (like torchtune's ``tune cp``)."""
    known = recipes()
    if args.list:
        for name, path in known.items():
            first = (path.read_text(encoding="utf-8").splitlines() or [""])[0].lstrip("# ")
            print(f"{name:12} {first}")
        print(f"{'custom':12} {DEFAULT_RECIPE} sized for your own data: init custom FILE task.train=... task.dev=...")
        return
    if args.recipe == "custom":
        from .custom import write_recipe
        out = Path(args.path or "custom.yaml")
        if out.exists() and not args.force:
            raise MezoError(f"init: {out} exists (pass --force to overwrite it)")
        if not any(o.startswith("task.train=") for o in args.overrides):
            raise MezoError("init custom: name your data: task.train=FILE task.dev=FILE (and task.template, "
                            "task.verbalizer for its labels)")
        base = known[DEFAULT_RECIPE]
        from .runfiles import writing
        with writing(out):
            sized = write_recipe(base, load_config(base, args.overrides), args.overrides, out)
        print("\n".join([f"wrote {out}:", *(f"  {line}" for line in sized["why"]),
                         f"edit it, then: mezo-run train -c {out}"]))
        return
    if args.overrides:
        raise MezoError(f"init {args.recipe}: key=value overrides are for `init custom` (edit the copy instead)")
    if args.recipe not in known:
        raise MezoError(f"init: unknown recipe {args.recipe!r} (packaged: {', '.join(known) or 'none'})")
    out = Path(args.path or f"{args.recipe}.yaml")
    if out.is_dir() or (args.path or "").endswith(("/", os.sep)):
        out = out / f"{args.recipe}.yaml"
    if out.exists() and not args.force:
        raise MezoError(f"init: {out} exists (pass --force to overwrite it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    from .runfiles import writing
    with writing(out):
        out.write_text(known[args.recipe].read_text(encoding="utf-8"), encoding="utf-8")
    print(f"wrote {out}; edit it, then: mezo-run train -c {out}")


def cmd_export(args, cfg, registry):
    """A standalone model folder: the base model with the adapter merged in
    (peft's merge_and_unload) and its tokenizer, loadable by plain transformers
    (or vLLM) with no adapter and no mezo-run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapter import adapter_shapes, check_adapter_tensors, read_peft_adapter, read_tensors, replace_dir
    from .models import load_pretrained, resolve_model_dir, torch_dtype
    out = Path(args.merge)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MezoError(f"export: {out} exists and is not an empty folder")
    adapter = Path(args.adapter or Path(cfg.out_dir) / "adapter")
    full = adapter / "mezo_params.safetensors"   # hf.full_params runs: trained base weights by name
    # a missing, damaged or non-finite adapter is refused before the model is read
    state = read_tensors(adapter, full.name) if full.exists() else read_peft_adapter(adapter)
    if not full.exists():
        adapter_lora(cfg, adapter)  # a malformed adapter_config.json, in one line
    model_dir = resolve_model_dir(cfg.model.path)
    if not full.exists():   # shapes and dtypes against the model's adapter, before the model is read
        try:
            shapes = adapter_shapes(model_dir, cfg.lora)
        except (ValueError, RuntimeError, KeyError) as exc:   # e.g. target modules the model lacks
            raise MezoError(f"export: cannot apply {adapter} to {cfg.model.path}: "
                            f"{(str(exc).splitlines() or [''])[0][:200]}") from None
        check_adapter_tensors(state, shapes, adapter / "adapter_model.safetensors")
    model = load_pretrained(AutoModelForCausalLM, model_dir, dtype=torch_dtype(cfg.model.dtype))
    if full.exists():
        params = dict(model.named_parameters())
        bad = sorted(n for n in state if n not in params or params[n].shape != state[n].shape
                     or not state[n].dtype.is_floating_point)
        if bad:
            raise MezoError(f"export: {full} holds {bad[0]!r}, not a weight of that shape in {cfg.model.path}")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
    else:
        from peft import PeftModel
        try:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        except (ValueError, RuntimeError, KeyError) as exc:
            raise MezoError(f"export: cannot apply {adapter} to {cfg.model.path}: "
                            f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tokenizer = load_pretrained(AutoTokenizer, model_dir)
    from .runfiles import writing
    with writing(out, cleanup=tmp):   # a full disk: one line naming the folder, no part left
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    replace_dir(tmp, out)
    print(f"wrote {out}: {cfg.model.path} with {adapter} merged in (AutoModelForCausalLM.from_pretrained)")


def main(argv=None, registry: Registry | None = None) -> int:
    """The command line; ``registry``: the plugins to use (default: the installed ones)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="mezo-run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in [("train", "fine-tune with MeZO"), ("eval", "evaluate on the dev set"),
                           ("backends", "list backend plugins"), ("config", "print the resolved config")]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("-c", "--config", default=None, help=f"YAML file (default: {DEFAULT_CONFIG} where it exists, else the packaged {DEFAULT_RECIPE} recipe)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mezo.steps=100 backend=vllm")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue the run in out_dir")
        if name == "eval":
            p.add_argument("--adapter", help="a PEFT adapter folder to evaluate")
            p.add_argument("--predictions", metavar="FILE",
                           help="write one JSON line per dev row: its prediction, gold label and losses "
                                "(completion tasks: the greedy generation)")
        if name == "config":
            p.add_argument("--reference", action="store_true", help="print every field as a Markdown table")
    p = sub.add_parser("export", help="write a standalone model with the adapter merged in")
    p.add_argument("-c", "--config", default=None, help=f"YAML file (default: {DEFAULT_CONFIG} where it exists, else the packaged {DEFAULT_RECIPE} recipe): model.path")
    p.add_argument("--merge", required=True, metavar="OUT", help="the model folder to write")
    p.add_argument("--adapter", help="the adapter folder (default: OUT_DIR/adapter of the config)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.path=...")
    p = sub.add_parser("init", help="copy a packaged recipe to an editable YAML file, or size one for your data")
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE,
                   help=f"recipe name (default {DEFAULT_RECIPE}), or custom: {DEFAULT_RECIPE} sized for task.train")
    p.add_argument("path", nargs="?", help="file or folder to write (default ./RECIPE.yaml)")
    p.add_argument("--list", action="store_true", help="list the packaged recipes")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("overrides", nargs="*", help="init custom: your data and prompt, e.g. task.train=FILE")
    # options may stand between the key=value overrides (``train a=1 -c x.yaml b=2``): argparse
    # leaves the overrides after an option unparsed; they join the others, anything else is refused
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    try:
        if args.command == "init":
            cmd_init(args)
            return 0
        from .models import quiet_torchao_import
        quiet_torchao_import()   # peft imports it where installed: its import-time log noise, silenced
        init_from_env()  # torchrun: join the data-parallel group
        registry = registry or Registry(make_plugin_manager())
        config_file = None if args.command == "backends" else (args.config or default_config())
        cfg = load_config(config_file, args.overrides, registry)
        set_threads(cfg)
        registry.get("backends", cfg.backend) if args.command != "backends" else None
        {"train": cmd_train, "eval": cmd_eval, "backends": cmd_backends,
         "config": cmd_config, "export": cmd_export}[args.command](args, cfg, registry)
    except DivergedError as exc:  # the guard could not recover the run: not a bad input
        print(f"mezo-run: error: {exc}", file=sys.stderr)
        return 3
    except MezoError as exc:
        print(f"mezo-run: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an input that cannot be read (permissions, a folder for a file)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mezo-run: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mezo-run: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
