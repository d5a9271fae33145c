"""Random translation (xpconv.augment): the plain-loop definition, the same values on every
namespace for one seed, the same on 1 and K ranks, and training batches only."""

from __future__ import annotations

import numpy as np
import pytest

from xpconv import backend
from xpconv.augment import default_max_shift, random_translate, translate, translation_offsets
from xpconv.backend import Generator, to_numpy
from xpconv.datasets import load_digits
from xpconv.models import SimpleConvNet
from xpconv.training import LocalCommunicator, Schedule, Trainer
from xpconv.training.schedule import translation_offsets_of_step


def _loop_translate(x, dy, dx):
    """The definition: out[n, c, h, w] = x[n, c, h + dy[n], w + dx[n]], zero outside."""
    N, C, H, W = x.shape
    out = np.zeros_like(x)
    for n in range(N):
        for h in range(H):
            for w in range(W):
                hh, ww = h + int(dy[n]), w + int(dx[n])
                if 0 <= hh < H and 0 <= ww < W:
                    out[n, :, h, w] = x[n, :, hh, ww]
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_translate_is_the_plain_loop(dtype, k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((7, 2, 6, 9)).astype(dtype)
    dy, dx = translation_offsets(Generator(k), 7, k)
    assert min(dy.min(), dx.min()) >= -k and max(dy.max(), dx.max()) <= k
    got = translate(x, dy, dx, k)
    assert got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_array_equal(got, _loop_translate(x, dy, dx))
    # a zero shift is the identity; a shift of k moves the content and zero-fills
    np.testing.assert_array_equal(translate(x, [0] * 7, [0] * 7, k), x)
    moved = translate(x, [k] * 7, [0] * 7, k)
    np.testing.assert_array_equal(moved[:, :, : 6 - k], x[:, :, k:])
    assert not moved[:, :, 6 - k :].any()


def test_one_seed_gives_the_same_batch_on_every_namespace(xp):
    host = np.random.default_rng(0).random((16, 1, 8, 8)).astype(np.float32)
    want = random_translate(host, 2, 123)
    x = backend.asarray_in(host, xp)
    got = random_translate(x, 2, 123)
    assert backend.namespace_of(got) is backend.namespace_of(x)  # it stays on the data's namespace
    np.testing.assert_array_equal(to_numpy(got), want)
    assert not np.array_equal(want, host)  # something moved
    assert not np.array_equal(to_numpy(random_translate(x, 2, 124)), want)  # another seed, other offsets


@pytest.mark.parametrize("K", [2, 4])
def test_the_ranks_offsets_make_up_the_single_process_offsets(K):
    B, seed, step = 12, 5, 7
    dy1, dx1 = translation_offsets_of_step(seed, step, B, 2)
    parts = [translation_offsets_of_step(seed, step, B, 2, rank=r, size=K) for r in range(K)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), dy1)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), dx1)
    x = np.random.default_rng(1).random((B, 1, 8, 8))
    shards = [translate(x[r * B // K : (r + 1) * B // K], *parts[r], 2) for r in range(K)]
    np.testing.assert_array_equal(np.concatenate(shards), translate(x, dy1, dx1, 2))
    # another step draws other offsets; the Schedule method is this function for its rank
    assert not np.array_equal(translation_offsets_of_step(seed, step + 1, B, 2)[0], dy1)
    np.testing.assert_array_equal(Schedule(100, B, seed, rank=1, size=K).translation_offsets(step, 2)[0], parts[1][0])


def test_default_shift_for_28x28_and_8x8():
    assert default_max_shift(28, 28) == 2 and default_max_shift(8, 8) == 1 and default_max_shift(32, 32) == 2


def test_bad_offsets_and_inputs_are_refused():
    x = np.zeros((2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"expected offsets in \[-1, 1\], got dy from 0 to 2"):
        translate(x, [0, 2], [0, 0], 1)
    with pytest.raises(ValueError, match="expected 2 offsets in dx"):
        translate(x, [0, 0], [0], 1)
    with pytest.raises(ValueError, match=r"expected a 4-D input \(N, C, H, W\), got shape \(2, 16\)"):
        translate(np.zeros((2, 16)), [0, 0], [0, 0], 1)
    with pytest.raises(ValueError, match="max_shift must be an integer >= 0"):
        translate(x, [0, 0], [0, 0], -1)


# ----------------------------------------------------------------------------- in the trainer


@pytest.fixture(scope="module")
def digits():
    (x_train, t_train), (x_test, t_test) = load_digits(normalize=True, flatten=False)
    return x_train[:240], t_train[:240], x_test[:60], t_test[:60]


def _net(xp="numpy"):
    return SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1},
                         hidden_size=16, weight_init_std=0.1, xp=xp, seed=0)


class Recording(Trainer):
    """A trainer that keeps a host copy of every training batch it steps on."""

    def train_step(self, x_batch, t_batch):
        self.seen.append(to_numpy(x_batch).copy())
        return super().train_step(x_batch, t_batch)


def _recorded(data, *, augment, comm=None, xp="numpy", epochs=2):
    tr = Recording(_net(xp), *data, epochs=epochs, mini_batch_size=40, optimizer="sgd", verbose=False, seed=3,
                   augment=augment, comm=comm)
    tr.seen = []
    tr.train()
    return tr


def test_the_trainer_translates_the_training_batches_only(digits):
    tr = _recorded(digits, augment=1)
    assert tr.augment == 1
    x = digits[0]
    for i, xb in enumerate(tr.seen):
        epoch, it = divmod(i, tr.schedule.steps_per_epoch)
        step = tr.schedule.global_step(epoch + 1, it + 1)
        rows = tr.schedule.batches(epoch + 1)[it]
        np.testing.assert_array_equal(xb, translate(x[rows], *translation_offsets_of_step(3, step, 40, 1), 1))
    # the evaluation sees the data as it is: the accuracy of the trained model on the raw sets
    assert tr.history[-1]["train_acc"] == tr.network.accuracy(x, digits[1])
    assert tr.history[-1]["test_acc"] == tr.network.accuracy(digits[2], digits[3])
    assert _recorded(digits, augment=True).augment == 1  # True: the default for 8x8 images
    plain = _recorded(digits, augment=None)
    assert plain.augment == 0
    np.testing.assert_array_equal(plain.seen[0], x[plain.schedule.batches(1)[0]])


def test_the_trainer_augments_alike_on_1_and_2_ranks(digits):
    one = _recorded(digits, augment=2, epochs=1)
    halves = []
    for r in range(2):
        comm = LocalCommunicator()
        comm.rank, comm.size = r, 2  # rank r of a 2-rank job (its batches do not depend on the others)
        halves.append(_recorded(digits, augment=2, comm=comm, epochs=1).seen)
    assert len(halves[0]) == len(one.seen) == 6
    for s, whole in enumerate(one.seen):
        np.testing.assert_array_equal(np.concatenate([halves[0][s], halves[1][s]]), whole)


def test_the_trainer_augments_on_the_models_namespace(xp, digits):
    tr = _recorded(digits, augment=1, xp=backend.namespace_name(xp), epochs=1)
    ref = _recorded(digits, augment=1, epochs=1)
    for a, b in zip(tr.seen, ref.seen):
        np.testing.assert_array_equal(a, b)


def test_augment_needs_images(digits):
    x = digits[0].reshape(len(digits[0]), -1)
    with pytest.raises(ValueError, match=r"augment needs image data \(N, C, H, W\), got training data of shape \(240, 64\)"):
        Trainer(_net(), x, digits[1], digits[2], digits[3], verbose=False, augment=1)
