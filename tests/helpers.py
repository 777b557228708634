"""Input builders shared by the tests."""
import torch

LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_input(shape, layout, dtype, device, mean=0.0, std=1.0, generator=None):
    """A tensor of `shape` whose memory is channels-first contiguous, channels-last (C innermost), or a
    non-dense strided view (every other element of a larger tensor, with a skewed storage offset)."""
    if layout == "channels_last":
        perm = [0] + list(range(2, len(shape))) + [1]  # (N, *S, C)
        base = torch.randn([shape[p] for p in perm], generator=generator, dtype=torch.float64)
        x = base.permute([perm.index(d) for d in range(len(shape))])
    elif layout == "strided":
        big = torch.randn([*shape[:-1], 2 * shape[-1] + 1], generator=generator, dtype=torch.float64)
        x = big[..., 1::2]
    else:
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (x * std + mean).to(device=device, dtype=dtype)


def memory_layout_matches(a, b):
    """Whether a and b put their elements in the same memory order (same strides on the dims that matter)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def is_dense(x):
    """Channels-first contiguous or channels-last (C innermost, the rest contiguous)."""
    return x.is_contiguous() or x.movedim(1, -1).is_contiguous()


def misaligned_copy(x):
    """A copy of dense `x` with the same strides whose data starts one element into its storage, so the
    pointer is not 16-byte aligned (as a slice of a larger tensor can be)."""
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    y = storage[1:].as_strided(x.shape, x.stride())
    return y.copy_(x)
