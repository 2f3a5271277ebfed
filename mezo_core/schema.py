"""The run configuration's fields: one dataclass a section, each field's default and
its meaning (``setting``: the field's ``metadata["help"]``; ``mezo-run config
--reference`` prints them; ``config`` loads and checks a run's values against them).
Plugins add their own sections (``config.plugin_sections``)."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

DEFAULT_RECIPE = "sst2"
DEFAULT_CONFIG = f"conf/{DEFAULT_RECIPE}.yaml"  # in the working directory, else the packaged recipe
#: ranges beyond which a value is a mistake, not a setting: refused in one line, not a traceback or a silent run
MAX_Q, MIN_EPS, MAX_LORA_R, MAX_TEMPLATE, MAX_THREADS = 4096, 1e-7, 65536, 10_000, 1024
#: model.quantization's values (the hf backend: torchao; the engines: their fp8)
QUANTIZATIONS = (None, "int8", "fp8", "fp8w")
#: selection.correction's values (mezo_core.selection.best_level applies them)
BEST_CORRECTIONS = ("bonferroni", "none")


def setting(default: Any = MISSING, help: str = "", *, factory: Any = MISSING) -> Any:
    """A dataclass field with its meaning in ``metadata["help"]``, which ``mezo-run config
    --reference`` prints; ``factory`` makes a mutable default (a list, a dict). A plugin's
    options dataclass may use it too, or plain ``field(default=..., metadata={"help": ...})``."""
    return field(default=default, default_factory=factory, metadata={"help": help})


def recipes_dir() -> Path:
    """The recipes shipped with mezo-run: ``mezo_core.recipes`` in a wheel or an
    editable install (mapped to conf/), else the checkout's conf/ (an editable
    install made before the recipes were packaged)."""
    from importlib.resources import files
    try:
        return Path(str(files("mezo_core.recipes")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "conf"


def recipes() -> dict[str, Path]:
    """Recipe name -> its YAML file."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"), key=lambda p: p.stem)}


def default_config() -> Path:
    """conf/sst2.yaml of the working directory when there is one (a checkout, or a
    copy made by ``mezo-run init``), else the packaged recipe: train runs anywhere."""
    here = Path(DEFAULT_CONFIG)
    return here if here.exists() else recipes_dir() / f"{DEFAULT_RECIPE}.yaml"


@dataclass
class ModelConfig:
    path: str = setting("${assets}/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
                        "a Hugging Face model folder or a .gguf file (converted once into ~/.cache/mezo-run)")
    dtype: str = setting("float32", "float32 | bfloat16 | float16")
    device: str = setting("cpu", "cpu | cuda | cuda:N | mps")
    quantization: Optional[str] = setting(None, "frozen base weights in 8 bits (the adapter and MeZO "
                                                "unchanged): int8 (weight-only), fp8 (fp8 weights and "
                                                "activations: FP8 matmuls, GPUs of compute capability >= "
                                                "8.9), fp8w (fp8 weight-only); null: off")


@dataclass
class LoraConfig:
    r: int = setting(8, "LoRA rank")
    alpha: float = setting(16.0, "LoRA scaling numerator (scale = alpha / r)")
    target_modules: List[str] = setting(factory=lambda: ["q_proj", "v_proj"], help="module names to adapt")
    layers: Optional[List[int]] = setting(None, "None: every layer")


@dataclass
class TaskConfig:
    kind: str = setting("classification", "classification (verbalizer words) | multiple_choice (each row's "
                                          "own \"choices\") | completion | reward (prompts whose generated "
                                          "completions a reward plugin scores)")
    train: str = setting("${assets}/data/sst2/train.tsv", ".tsv (sentence, label) or .jsonl")
    dev: str = setting("${assets}/data/sst2/dev.tsv", "the reported evaluation set")
    hf_dataset: Any = setting(None, "a Hugging Face dataset instead of the files: \"PATH\" or \"PATH:NAME\" "
                                    "(glue:sst2), or a mapping {path, name, split_train, split_dev, "
                                    "split_val, text_field, label_field, ...} (needs `datasets`)")
    template: str = setting("{text} It was", "classification/multiple-choice prompt; {text} is the input")
    verbalizer: Any = setting(help="word of label i, or {label name: word} (the data's labels may then be "
                                   "the names)", factory=lambda: [" terrible", " great"])
    k_per_class: Optional[int] = setting(16, "MeZO-paper sampling: k train examples per class ...")
    n_train: Optional[int] = setting(None, "... or n examples (when k_per_class is null)")
    n_dev: Optional[int] = setting(None, "a seeded random sample of n dev examples (null: all)")
    n_val: int = setting(0, "validation examples drawn from the train file, disjoint from the training "
                            "sample: what periodic evaluations select the best adapter and early-stop on (0: "
                            "select on dev)")
    val: Optional[str] = setting(None, "a validation file of its own (e.g. held-out data distributed like "
                                       "dev) instead of the train file; n_val then samples it (0: all of it)")
    val_overlap_words: int = setting(4, "a train row and a validation row where one is a run of >= this many "
                                        "words of the other are not both used: the train row is left out "
                                        "(treebank phrases such as SST-2's would otherwise train on pieces of "
                                        "the validation sentences); 0: no check")
    sample_seed: int = setting(42, "seed of the train/dev/validation sampling")
    train_loss: str = setting("choices", "classification/multiple-choice loss: \"choices\" = cross-entropy "
                                         "among the candidates (the verbalizer's words or the row's choices, "
                                         "each scored by its mean token loss: MeZO's "
                                         "train_as_classification); \"target\" = LM loss of the gold candidate")
    max_tokens: Optional[int] = setting(None, "longest sequence (prompt + answer) in tokens: longer texts are "
                                              "cut, never the template's answer slot (null: no limit)")
    group_by_length: bool = setting(False, "training batches of rows of similar length (less padding)")
    exact_match: bool = setting(True, "completion tasks: also score greedy generations against the gold "
                                      "completion (exact_match)")
    reward: str = setting("exact_match", "reward tasks: the reward plugin scoring each completion against the "
                                         "row's reference: label_word, exact_match, regex, numeric")
    reward_options: Dict[str, Any] = setting(factory=dict, help="the reward's own settings")
    max_new_tokens: int = setting(16, "reward tasks: the longest completion in tokens (generation also "
                                      "stops at EOS)")
    samples: int = setting(1, "reward tasks: completions per prompt and perturbed state (1: the greedy one; "
                              "more: sampled at task.temperature, seeded from the step)")
    temperature: float = setting(1.0, "reward tasks with task.samples > 1: the sampling temperature")


@dataclass
class MezoConfig:
    steps: int = setting(200, "optimisation steps (2 q forward passes each)")
    batch_size: int = setting(16, "examples per step")
    q: int = setting(1, "directions per step")
    lr: float = setting(1e-4, "step size (the peak, for shaped schedules)")
    lr_schedule: str = setting("constant", "a schedule plugin: constant, linear, cosine, exponential, spall, "
                                           "fzoo, rms")
    lr_end: Optional[float] = setting(None, "final lr of linear/cosine/exponential (null: lr)")
    warmup_steps: int = setting(0, "linear lr warm-up from 0")
    eps: float = setting(1e-3, "perturbation size")
    eps_schedule: str = setting("constant", "a schedule plugin: constant, ..., spall_eps, noise_floor")
    eps_end: Optional[float] = setting(None, "final eps of shaped schedules (null: eps)")
    weight_decay: float = setting(0.0, "decoupled decay, theta <- (1 - lr*wd) theta")
    weight_decay_exempt: List[str] = setting(help="tensors whose name contains one of these are not decayed "
                                                  "(MeZO's reference spares biases and layer norms; matters "
                                                  "with hf.full_params)", factory=lambda: ["bias", "norm"])
    fuse_steps: bool = setting(True, "fold restore + update + the next step's +eps*z into one pass over the "
                                     "weights (2 passes per step instead of 3), except before an evaluation "
                                     "or checkpoint")
    z: str = setting("gaussian", "distribution of z: gaussian (MeZO) or rademacher (+-1, SPSA)")
    ema_half_life: int = setting(0, "evaluate, select and save an exponential moving average of the weights, "
                                    "half of it from the last ema_half_life steps (mezo_core/average.py: SPSA "
                                    "iterate averaging); 0: the raw weights")
    estimator: str = setting("mezo", "how a step's forwards become an update, an estimator plugin: mezo "
                                     "(two-sided SPSA, 2q forwards), fzoo (one-sided, q+1 forwards, step "
                                     "normalised by the spread of the losses), es (a population of q, "
                                     "rewards -L normalised across it), hizoo (q=1, 3 forwards, directions "
                                     "preconditioned by a diagonal curvature estimate; hf only), sparse (SPSA on "
                                     "the small-magnitude weights; hf, meant for hf.full_params), lozo (SPSA "
                                     "along low-rank U V^T; hf, meant for hf.full_params)")
    estimator_options: Dict[str, Any] = setting(factory=dict, help="the estimator's own settings")
    lr_schedule_options: Dict[str, Any] = setting(factory=dict, help="the schedule's own settings")
    eps_schedule_options: Dict[str, Any] = setting(factory=dict, help="the eps schedule's settings")


@dataclass
class GuardConfig:
    """The convergence guard (mezo_core/guard.py): roll back and cut the step size
    when losses go non-finite or the smoothed training loss keeps rising."""
    enabled: bool = setting(True, "off: a run may collapse or go NaN unnoticed")
    window: int = setting(50, "EMA span of the training loss and of g^2")
    warmup: int = setting(20, "steps before the guard judges")
    rise: float = setting(0.2, "tolerated rise of the smoothed loss over its best (relative) ...")
    rise_abs: float = setting(0.05, "... plus this much (absolute)")
    patience: int = setting(50, "steps above that before a roll-back")
    cut: float = setting(0.5, "step-size factor after a roll-back for a rise")
    nonfinite_cut: float = setting(0.1, "... after a non-finite step")
    clip: float = setting(10.0, "clip |g| to clip x its running RMS (0: off)")
    max_recoveries: int = setting(8, "roll-backs before the run stops (exit 3)")


@dataclass
class SelectionConfig:
    """Which evaluated adapter best/ keeps and the run hands over (mezo_core/selection.py);
    evaluations come every ``eval_every`` steps."""
    significance: float = setting(0.05, "best/ changes only for an adapter right on significantly more "
                                        "examples (one-sided paired sign test; the level of the whole run, "
                                        "see correction; 0: any gain)")
    correction: str = setting("bonferroni", "bonferroni: the first move off the first adapter is tested at "
                                            "significance / ceil(mezo.steps / eval_every), so noise alone "
                                            "moves best/ with probability <= significance over the run; later "
                                            "moves at significance; none: every test at significance (noise "
                                            "passes far more often)")
    load_best_at_end: bool = setting(True, "with eval_every: adapter/, the run's result, is best/ (selected "
                                           "on task.n_val's validation set, or dev without one); false: the "
                                           "last adapter. last/ (the trained weights) and best/ are always "
                                           "kept")
    early_stop_patience: int = setting(0, "stop after this many evaluations without a new best (0: never)")


#: fields that moved into a section: an old key is an error naming the new one
MOVED = {"best_significance": "selection.significance", "best_correction": "selection.correction",
         "load_best_at_end": "selection.load_best_at_end", "early_stop_patience": "selection.early_stop_patience"}


@dataclass
class RunConfig:
    backend: str = setting("hf", "a backend plugin: hf, vllm, sglang, ... (mezo-run backends)")
    seed: int = setting(0, "the batches and z directions are functions of (seed, step)")
    assets: str = setting("${oc.env:MEZO_ASSETS,../shared/assets}", "folder with models/ and data/")
    out_dir: str = setting("runs/sst2", "the run folder (locked while a run uses it)")
    eval_every: int = setting(0, "0: only zero-shot and final")
    eval_batch_size: int = setting(32, "rows per evaluation forward")
    checkpoint_every: int = setting(50, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = setting(2, "newest checkpoints kept")
    zero_shot: bool = setting(True, "evaluate before the first step")
    plot: bool = setting(True, "write training.png at the end")
    progress: bool = setting(True, "progress bars")
    report_to: List[str] = setting(factory=lambda: ["jsonl"], help="loggers: jsonl, csv, tensorboard, ...")
    threads: Optional[int] = setting(None, "torch intra-op threads (null: OMP_NUM_THREADS, else the usable "
                                           "cores)")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    mezo: MezoConfig = field(default_factory=MezoConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    # + one section per plugin with options (hf, vllm, ...): plugin_sections()
