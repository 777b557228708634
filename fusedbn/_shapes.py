"""Reshapes between a tensor's layout and the per-channel view the ops and their derivatives use."""


def channel_view(t, like):
    """A per-channel (C,) tensor viewed to broadcast against ``like`` (N, C, *)."""
    return None if t is None else t.view(1, -1, *([1] * (like.dim() - 2)))


# torch.func.vmap over B problems is one problem with B*C channels: an input-shaped (B, N, C, *) batch
# becomes (N, B*C, *) and per-channel (B, C) tensors (B*C), so the kernels see no batch dimension at all.
def input_to_channels(t, dim, size):
    if t is None:
        return None
    t = t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)
    return t.movedim(0, 1).flatten(1, 2)


def param_to_channels(t, dim, size):
    if t is None:
        return None
    t = t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)
    return t.reshape(-1)


def act_weight_to_channels(t, dim, size, like):
    """PReLU's weight (1 or C values per problem) as B*C values, one per channel of ``like`` (an input already
    made (N, B*C, *) by input_to_channels): a problem's single value repeated over its C channels."""
    if t is None:
        return None
    t = t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)
    return t.reshape(size, -1).expand(size, like.shape[1] // size).reshape(-1)


def act_weight_to_batch(t, size, shape):
    """The B*C gradient of act_weight_to_channels's result as B gradients of one problem's weight, of ``shape``
    (a single value's gradient summed over its problem's channels)."""
    t = t.unflatten(0, (size, -1))
    return (t.sum(1) if shape.numel() == 1 else t).reshape(size, *shape)


def channels_to_batch(t, size):
    return t.unflatten(1, (size, -1)).movedim(1, 0)


def params_to_batch(t, size):
    return t.unflatten(0, (size, -1))


def flat_param(t):
    """weight or bias of any shape with C elements (torch and the ops read them so) as the Functions take it,
    1-D; autograd returns its gradient in the shape given, through the reshape."""
    return t.reshape(-1) if t is not None and t.dim() != 1 else t
