import os
import sys

import pytest

TRAINING_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TRAINING_DIR)
sys.path.insert(0, TRAINING_DIR)

SHARED_MODELS = os.path.join(REPO_ROOT, "..", "shared", "models")
KVGATE_BIN = os.path.join(REPO_ROOT, "build", "cli", "kvgate")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A tokenizer trained once per session on the corpus's training split (vocab 1024)."""
    from kvgate_train.tokenizer import save_tokenizer_dir, train_tokenizer, training_texts
    out = tmp_path_factory.mktemp("tokenizer")
    tok = train_tokenizer(training_texts(seed=0, num_task_samples=500), vocab_size=1024)
    save_tokenizer_dir(tok, str(out), 1024)
    return str(out)


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    from kvgate_train.tokenizer import load_tokenizer
    return load_tokenizer(tokenizer_dir)
