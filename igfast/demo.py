"""`igfast demo`: a real model on real data, with no download.

A small CNN is trained (seeded, a few seconds) on scikit-learn's bundled digits
data set (8x8 grey images) and cached in the user's cache directory. igfast
attributes its predictions for a few test images, checks completeness, times
itself against Captum when Captum is installed, and writes a picture (input,
heatmap, overlay per image). When the MiniLM example can run, it also writes a
token-highlight view of a sentence-similarity attribution (HTML).
"""

import os
import pickle
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import IntegratedGradients, info
from .errors import ArgumentError

CACHE_VERSION = 1  # bump when the model or its training changes
TEST_EXAMPLES = 297  # of the 1797 digits; the rest train the model


class DigitsCNN(nn.Module):
    """1x8x8 digit images to 10 classes."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@dataclass
class Digits:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digits() -> Digits:
    """scikit-learn's digits (bundled with it, no download), scaled to [0, 1] and
    split with a seeded permutation."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError("the demo needs scikit-learn: pip install scikit-learn "
                          "(or the extra: pip install 'igfast[demo]')") from error
    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = order[:TEST_EXAMPLES], order[TEST_EXAMPLES:]
    return Digits(images[train], labels[train], images[test], labels[test])


def cache_dir() -> str:
    """$IGFAST_CACHE_DIR, else $XDG_CACHE_HOME/igfast, else ~/.cache/igfast."""
    explicit = os.environ.get("IGFAST_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "igfast")


def train_digits_cnn(digits: Digits, epochs: int = 12, seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(digits.train_labels), generator=generator).split(64):
            optimiser.zero_grad()
            loss = F.cross_entropy(model(digits.train_images[batch]), digits.train_labels[batch])
            loss.backward()
            optimiser.step()
    return model.eval()


def trained_digits_cnn(digits: Digits, retrain: bool = False) -> Tuple[DigitsCNN, str]:
    """The cached model, or a newly trained one (then cached when the cache is
    writable). Returns (model, where it came from)."""
    path = os.path.join(cache_dir(), f"digits_cnn_v{CACHE_VERSION}.pt")
    if not retrain and os.path.exists(path):
        model = DigitsCNN()
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval(), f"loaded from {path}"
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):
            pass  # a damaged cache file is replaced below (garbage fails to unpickle)
    started = time.perf_counter()
    model = train_digits_cnn(digits)
    seconds = time.perf_counter() - started
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(model.state_dict(), path)
        where = f"trained in {seconds:.1f} s, cached at {path}"
    except (OSError, RuntimeError) as error:  # (torch.save raises RuntimeError where it cannot write)
        where = f"trained in {seconds:.1f} s (not cached: {getattr(error, 'strerror', None) or error})"
    return model, where


def _speed(ratio: float) -> str:
    """Captum's time over igfast's, in words that fit either side of 1."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _median_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    run()  # warm-up
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


TEXT_STEPS_AT_MOST = 20


def _text_demo(out_dir: str, n_steps: int) -> Optional[str]:
    """LayerIG on MiniLM, written as token highlights; None when it cannot run."""
    from .bench.workloads import minilm_available

    missing = minilm_available()
    if missing:
        print(f"\ntext: skipped (the MiniLM example needs: {missing})")
        return None
    from . import LayerIntegratedGradients
    from .examples import minilm
    from .viz import save_token_html

    task = minilm.similarity_task()
    attributions, delta = LayerIntegratedGradients(task.model, task.layer).attribute(
        task.inputs, n_steps=n_steps, return_convergence_delta=True, **task.attribute_kwargs())
    scores = minilm.token_scores(attributions)
    with torch.no_grad():
        similarity = task.model(task.inputs, *task.additional_forward_args)
    rows = []
    print(f"\ntext: all-MiniLM-L6-v2, LayerIntegratedGradients on the token embeddings, n_steps={n_steps}")
    for index, (sentence, reference) in enumerate(zip(minilm.SENTENCES, minilm.PAIRED_SENTENCES)):
        if index >= len(task.tokens):
            break
        real = [i for i, t in enumerate(task.tokens[index]) if t != "[PAD]"]
        tokens = [task.tokens[index][i] for i in real]
        values = [float(scores[index, i]) for i in real]
        top = sorted(zip(tokens, values), key=lambda tv: -abs(tv[1]))[:3]
        caption = (f"cos(\"{sentence}\", \"{reference}\") = {float(similarity[index]):.3f}, "
                   f"|delta| = {abs(float(delta[index])):.1e}")
        rows.append((tokens, values, caption))
        print(f"  {caption}\n    strongest tokens: "
              + ", ".join(f"{t} {v:+.3f}" for t, v in top))
    path = os.path.join(out_dir, "igfast-demo-tokens.html")
    save_token_html(rows, path, title="igfast: which tokens make two sentences similar")
    print(f"  wrote {path}")
    return path


def run_demo(out_dir: str = ".", images: int = 4, n_steps: int = 50, retrain: bool = False,
             text: bool = True) -> dict:
    """The whole demo; returns the paths written and the figures printed."""
    if not 1 <= images <= TEST_EXAMPLES:
        raise ArgumentError(f"`images` must be between 1 and {TEST_EXAMPLES} (the digits test set); got {images}.")
    state = info()
    print(f"igfast {state['igfast']} on torch {state['torch']}: {state['path']} path ({state['reason']})")
    digits = load_digits()
    model, where = trained_digits_cnn(digits, retrain)
    with torch.no_grad():
        accuracy = float((model(digits.test_images).argmax(1) == digits.test_labels).float().mean())
    print(f"digits CNN ({where}): test accuracy {accuracy:.1%} on {TEST_EXAMPLES} images")

    x, labels = digits.test_images[:images], digits.test_labels[:images]
    with torch.no_grad():
        probabilities = model(x).softmax(1)
    predicted = probabilities.argmax(1)
    ours = IntegratedGradients(model)
    attributions, delta = ours.attribute(x, baselines=0.0, target=predicted, n_steps=n_steps,
                                         return_convergence_delta=True)
    ours_seconds = _median_seconds(lambda: ours.attribute(x, baselines=0.0, target=predicted,
                                                          n_steps=n_steps))
    print(f"\nIntegratedGradients, {images} test image{'s' if images > 1 else ''}, n_steps {n_steps}, "
          "black baseline:")
    titles = []
    for i in range(images):
        p = float(probabilities[i, predicted[i]])
        print(f"  image {i}: label {int(labels[i])}, predicted {int(predicted[i])} ({p:.0%}), "
              f"completeness |delta| = {abs(float(delta[i])):.1e}")
        titles.append(f"label {int(labels[i])}, predicted {int(predicted[i])} ({p:.0%})")
    summary = {"accuracy": accuracy, "delta_max": float(delta.abs().max()),
               "igfast_seconds": ours_seconds}
    try:
        from captum.attr import IntegratedGradients as CaptumIntegratedGradients
    except ImportError:
        print(f"  igfast: {1e3 * ours_seconds:.2f} ms (pip install captum for the side-by-side)")
    else:
        theirs = CaptumIntegratedGradients(model)
        reference = theirs.attribute(x, baselines=0.0, target=predicted, n_steps=n_steps)
        theirs_seconds = _median_seconds(lambda: theirs.attribute(x, baselines=0.0, target=predicted,
                                                                  n_steps=n_steps))
        difference = float((attributions - reference.detach()).abs().max())
        print(f"  igfast {1e3 * ours_seconds:.2f} ms, Captum {1e3 * theirs_seconds:.2f} ms "
              f"(medians of 5): igfast {_speed(theirs_seconds / ours_seconds)}; "
              f"max |igfast - Captum| = {difference:.1e}")
        summary.update(captum_seconds=theirs_seconds, max_difference=difference)

    from .viz import save_image_attributions

    picture = os.path.join(out_dir, "igfast-demo-digits.png")
    save_image_attributions(x, attributions, picture, titles)
    print(f"  wrote {picture}")
    summary["picture"] = picture
    # Fewer steps for the text: a MiniLM path costs far more than a digit's, and the
    # demo should stay quick; the heading prints the steps, so the |delta| can be read.
    summary["html"] = _text_demo(out_dir, min(n_steps, TEXT_STEPS_AT_MOST)) if text else None
    return summary
