"""The test helpers live in ``mezo_core.testing`` (importable by plugin packages
and benchmarks); this name stays for the tests that import ``tiny``."""
from mezo_core.testing import (WORDS, InterruptAt, build_model, corpus, train_tokenizer,  # noqa: F401
                               write_run_config, write_task_files)


def replay_seed(default: int) -> int:
    """MEZO_TEST_SEED or ``default``, printed (pytest shows it with a failure) so that a
    failing draw can be replayed."""
    import os
    seed = int(os.environ.get("MEZO_TEST_SEED", default))
    print(f"seed {seed} (replay: MEZO_TEST_SEED={seed})")
    return seed
