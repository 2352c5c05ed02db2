"""Small rank helpers that fall back to one process (dinov2 `distributed/__init__.py` style).

Every helper works without an initialised process group (world size 1), so the
same training code runs in single-process CPU tests.

    init_from_env()        # torchrun: RANK / LOCAL_RANK / WORLD_SIZE; nccl on CUDA, gloo on CPU
    process_device()       # this process's device (also without a group)
    try: ... finally: teardown()

Collectives run on the group's device (`group_device`: the process's GPU under nccl,
the CPU under gloo). Every collective of the project goes through these helpers, and
they move what they are handed there and hand results back on the caller's device:
a tensor made on the CPU (a size, a flag) is never given to nccl, which refuses it.

`all_gather_with_grad(x)` gathers per-rank tensors whose first dimension may
differ between ranks (the last batch of an epoch, or a global batch that does
not divide by the world size). Its backward sums the incoming gradients of
every rank and hands each rank the part of its own slot, so the gradient of a
loss computed on any rank flows back into the rank that produced the rows
(`torch.distributed.nn.all_gather` semantics; gloo has no reduce-scatter, so
it all-reduces and slices).
"""
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

from config import ConfigError

_GATHER_GROUP = None   # a separate group keeps feature gathers apart from DDP's gradient buckets
_GROUP_DEVICE = torch.device('cpu')   # where the collectives run (group_device)
_JOB_STORE = None      # torchrun's store: outlives restarts of the processes (job_value)


def is_dist():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if is_dist() else 1


def rank():
    return dist.get_rank() if is_dist() else 0


def is_main_process():
    return rank() == 0


def launched_by_torchrun():
    return all(k in os.environ for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))


def visible_gpus(use_gpu=True):
    """GPUs this process can use: 0 with use_gpu off or without CUDA."""
    return torch.cuda.device_count() if use_gpu and torch.cuda.is_available() else 0


def select_gpus(gpu_id, use_gpu=True):
    """The config key `gpu_id` as the original's RecBole reads it: CUDA_VISIBLE_DEVICES = gpu_id,
    set before CUDA starts (spawned processes inherit it). None keeps the inherited value."""
    if gpu_id is None or not use_gpu or os.environ.get('CUDA_VISIBLE_DEVICES') == str(gpu_id):
        return
    if torch.cuda.is_initialized():
        raise ConfigError(f'gpu_id = {gpu_id}: CUDA is already initialised in this process, too late to '
                         'select devices; set CUDA_VISIBLE_DEVICES instead')
    os.environ['CUDA_VISIBLE_DEVICES'] = str(gpu_id)


def process_device(use_gpu=True):
    """The device of this process (the one place that chooses it): the CPU, or GPU LOCAL_RANK of
    those it sees. torchrun and --nproc show every process all GPUs of the node; a scheduler
    that gives each task its own (SLURM --gpus-per-task) shows fewer, hence the modulo."""
    gpus = visible_gpus(use_gpu)
    if not gpus:
        return torch.device('cpu')
    return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)) % gpus)


def init_from_env(use_gpu=True, timeout_s=1800, group_of_one=False):
    """Initialise the default process group from torchrun's environment (once).

    Returns the device of this process (`process_device`): nccl on CUDA, else gloo.
    Without torchrun variables, or with WORLD_SIZE 1, no group is created and the
    helpers keep their one-process defaults; `group_of_one` creates it even then
    (scripts/gpu_check.sh runs the collectives on one GPU this way).
    """
    global _GATHER_GROUP, _GROUP_DEVICE
    device = process_device(use_gpu)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if not launched_by_torchrun() or (int(os.environ['WORLD_SIZE']) == 1 and not group_of_one) or is_dist():
        return device
    # MISSREC_BACKEND=gloo: ranks that share one GPU (nccl refuses them; the GPU check uses it)
    backend = os.environ.get('MISSREC_BACKEND') or ('nccl' if device.type == 'cuda' else 'gloo')
    if backend not in ('nccl', 'gloo'):
        raise ConfigError(f'MISSREC_BACKEND={backend!r}: expected nccl or gloo')
    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun's store outlives a restart of the workers (--max-restarts), and the keys of the
    # failed attempt (its processes' addresses) would be read again: one prefix per attempt
    global _JOB_STORE
    _JOB_STORE, rank, world = next(dist.rendezvous('env://', timeout=timeout))
    store = dist.PrefixStore(f'attempt{restart_count()}', _JOB_STORE)
    # device_id binds the group to this GPU (otherwise NCCL guesses it at the first barrier)
    dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=rank, world_size=world,
                            device_id=device if backend == 'nccl' else None)
    _GATHER_GROUP = dist.new_group(backend=backend)
    _GROUP_DEVICE = device if backend == 'nccl' else torch.device('cpu')
    return device


def group_device():
    """The device of the collectives: the process's GPU under nccl, else the CPU."""
    return _GROUP_DEVICE


def teardown():
    global _GATHER_GROUP, _JOB_STORE, _GROUP_DEVICE
    if is_dist():
        dist.destroy_process_group()
    _GATHER_GROUP = _JOB_STORE = None
    _GROUP_DEVICE = torch.device('cpu')


def restart_count():
    """How often torchrun (--max-restarts) has restarted this job's processes."""
    return int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))


def job_value(key, make):
    """A string that stays the same for every attempt of a torchrun job: rank 0 of the first
    attempt makes it, restarted processes read it back from torchrun's store. Without a
    process group, simply `make()`."""
    if _JOB_STORE is None:
        return make()
    key = f'missrec/{key}'
    if restart_count() and _JOB_STORE.check([key]):
        return _JOB_STORE.get(key).decode()
    value = broadcast_object(make() if is_main_process() else None)
    if is_main_process():
        _JOB_STORE.set(key, value)
    return value


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_sum(x):
    """Sum of tensor `x` over ranks (a new tensor on x's device; `x` is not modified)."""
    if not is_dist():
        return x.clone()
    y = x.to(_GROUP_DEVICE, copy=True)
    dist.all_reduce(y)
    return y.to(x.device)


def max_over_ranks(n):
    """The largest of the ints `n` of every rank (`n` without a group)."""
    if not is_dist():
        return n
    t = torch.tensor(n, device=_GROUP_DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def broadcast_(x, src=0):
    """Broadcast tensor `x` from `src` in place; returns it."""
    if not is_dist():
        return x
    if x.device == _GROUP_DEVICE:
        dist.broadcast(x, src)
    else:
        y = x.to(_GROUP_DEVICE)
        dist.broadcast(y, src)
        x.copy_(y)
    return x


def broadcast_object(obj, src=0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without a group)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _sizes(n, group=None):
    """First-dimension sizes of every rank (one read on the host)."""
    t = torch.tensor([n], device=_GROUP_DEVICE)
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t, group=group)
    return torch.cat(out).tolist()


def _gather_padded(x, sizes, group=None):
    """all_gather of tensors with different first dimensions: pad to the largest, cut back
    (on x's device)."""
    top = max(sizes)
    xg = x.to(_GROUP_DEVICE)
    pad = xg.new_zeros((top - x.shape[0], *x.shape[1:]))
    xp = torch.cat([xg, pad]) if top > x.shape[0] else xg.contiguous()
    out = [torch.empty_like(xp) for _ in sizes]
    dist.all_gather(out, xp, group=group)
    return [o[:s].to(x.device) for o, s in zip(out, sizes)]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.group, ctx.sizes = group, sizes
        return torch.cat(_gather_padded(x, sizes, group))

    @staticmethod
    def backward(ctx, grad):
        summed = grad.to(_GROUP_DEVICE, copy=True).contiguous()
        dist.all_reduce(summed, group=ctx.group)   # every rank's loss contributes to every slot
        start = sum(ctx.sizes[:dist.get_rank()])
        return summed[start:start + ctx.sizes[dist.get_rank()]].to(grad.device), None, None


def share_sizes(global_rows):
    """The rows of each rank's share of a global batch of `global_rows` rows (rank r: rows r::W)."""
    w = world_size()
    return [len(range(r, global_rows, w)) for r in range(w)]


def all_gather_with_grad(x, sizes=None):
    """Concatenate `x` [b_r, ...] of every rank in rank order.

    Args:
        sizes: [b_0, b_1, ...] when known (`share_sizes`); else gathered (a read on the host).
    Returns:
        (x_all [sum_r b_r, ...], offset of this rank's rows in x_all).
    Tensors that do not require grad (e.g. item ids) are gathered without autograd.
    """
    if not is_dist():
        return x, 0
    sizes = sizes or _sizes(x.shape[0], _GATHER_GROUP)
    if x.requires_grad:
        out = _GatherWithGrad.apply(x, sizes, _GATHER_GROUP)
    else:
        out = torch.cat(_gather_padded(x, sizes, _GATHER_GROUP))
    return out, sum(sizes[:rank()])


def gather_rows_interleaved(x):
    """Undo `SeqBatches` sharding of one batch: rank r holds global rows r, r+W, r+2W, ...

    Returns the rows of all ranks in global batch order (every rank gets the result).
    """
    if not is_dist():
        return x
    sizes = _sizes(x.shape[0])
    parts = _gather_padded(x, sizes)
    w = len(parts)
    out = x.new_empty((sum(sizes), *x.shape[1:]))
    for r, p in enumerate(parts):
        out[r::w] = p
    return out


# ------------------------------------------------------------------- launching
def cpu_threads():
    """Threads per CPU process: the cores this process may use, split over the local processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    local = int(os.environ.get('LOCAL_WORLD_SIZE', os.environ.get('WORLD_SIZE', 1)))
    return max(1, cores // local)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def spawn(fn, nproc, *args):
    """Run fn(index, nproc, port, *args) in `nproc` local processes; a failing one stops them all."""
    import torch.multiprocessing as mp
    mp.spawn(fn, args=(nproc, free_port(), *args), nprocs=nproc, join=True)


def run_as_rank(index, nproc, port, entry, *args):
    """Body of a spawned process: the environment torchrun would set, then `entry(*args)`."""
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    code = entry(*args)
    if code:
        sys.exit(code)


def resolve_nproc(nproc, use_gpu):
    """Processes to spawn: `nproc`, or one per visible GPU (or one CPU process) when 0.
    More than the visible GPUs is refused: two processes on one GPU fail in NCCL."""
    gpus = visible_gpus(use_gpu)
    if nproc < 0:
        raise ValueError(f'--nproc {nproc}: expected a positive number of processes')
    if not nproc:
        return max(gpus, 1)
    if gpus and nproc > gpus:
        raise ValueError(f'--nproc {nproc}: only {gpus} GPU(s) visible; use --nproc {gpus} or fewer, '
                         'or --use_gpu=False for CPU processes')
    return nproc


def launch(entry, nproc, *args):
    """`entry(*args)` here (under torchrun, or for one process), else in `nproc` spawned processes.
    Returns an exit code."""
    if nproc == 1 or launched_by_torchrun():
        return entry(*args)
    try:
        spawn(run_as_rank, nproc, entry, *args)
    except Exception as e:   # ProcessRaisedException / ProcessExitedException carry the rank's error
        print(f'error: a process failed: {e}', file=sys.stderr)
        return 1
    return 0
