"""Many processes, one job: PyTorch's own distributed engine, set up from what `torchrun` provides.

Launched by `torchrun` (or `srun torchrun`), every process finds RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its environment; `session(device)` joins the process
group from them (gloo for CPU tensors, NCCL for CUDA tensors) and leaves it at the end. Started
without them (plain `traitscope ...`) the job is one process and every helper here is a no-op, so the
stages call them unconditionally.

    with dist.session(device) as world:          # World(rank, size, local_rank, local_size)
        mine = todo[world.rank::world.size]      # a disjoint share of the work
        ...
        dist.barrier()
        if world.is_main:
            ...                                  # one process writes the shared files

What the stages use: `pick_device` (cuda:LOCAL_RANK, mps or cpu), `say` (rank 0 prints),
`broadcast` / `all_gather` (small Python objects), `check_agree` (every rank computed the same plan),
`raise_if_any` (an error on one rank stops all of them with its message, instead of a hang),
`main_first` (rank 0 does something first, e.g. fills a shared cache), `all_reduce_` /
`all_gather_tensor` / `any_true` (tensors and flags), `cpus_per_rank` (decode threads that do not
oversubscribe a node), and `check_joined` (a stage called under torchrun outside a session refuses).
"""

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as tdist

from traitscope.errors import TraitscopeError

TIMEOUT_MIN_ENV = "TRAITSCOPE_DIST_TIMEOUT_MIN"
"""Environment variable: minutes a rank waits for the others at a collective (default 60)."""
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


class World(NamedTuple):
    """Where this process stands in the job."""

    rank: int = 0
    """Global rank, 0..size-1."""
    size: int = 1
    """Number of processes in the job (WORLD_SIZE)."""
    local_rank: int = 0
    """Rank on this machine (picks the GPU)."""
    local_size: int = 1
    """Processes on this machine."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes shared files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise TraitscopeError(f"environment variable {name}={value!r} is not a whole number") from None


def env_world() -> World:
    """The job as the launcher describes it in the environment (one process when nothing is set)."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if size > 1 else 0)
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    if size < 1 or not 0 <= rank < size or not 0 <= local_rank < max(local_size, 1):
        raise TraitscopeError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={size}, "
                              f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_size}")
    return World(rank, size, local_rank, local_size)


def world() -> World:
    """This process's place in the running job: from the process group when one is set up, else one process."""
    if tdist.is_available() and tdist.is_initialized():
        env = env_world()
        return World(tdist.get_rank(), tdist.get_world_size(), env.local_rank, env.local_size)
    return World()


def check_joined() -> None:
    """Refuse to run a stage in one process of a torchrun job that has not joined its process group:
    each process would do all the work and write the same files as the others."""
    if env_world().distributed and not (tdist.is_available() and tdist.is_initialized()):
        raise TraitscopeError("started by torchrun (WORLD_SIZE > 1) but not inside traitscope.dist.session(); "
                              "run the `traitscope` command, or wrap the call in `with dist.session(device):`")


def pick_device(name: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """The device this rank computes on.

    'auto' (or None): cuda:LOCAL_RANK when CUDA is available, else Apple's mps, else cpu. 'cuda' means
    cuda:LOCAL_RANK (one GPU per process, as torchrun launches them); 'cuda:N' is taken as given.
    """
    local_rank = env_world().local_rank if local_rank is None else local_rank
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif _mps_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TraitscopeError(f"--device {name}: no CUDA GPU is available to torch here; use --device cpu")
        index = local_rank if name == "cuda" else _cuda_index(name)
        n_gpus = torch.cuda.device_count()
        if index >= n_gpus:
            raise TraitscopeError(f"--device {name}: this process (local rank {local_rank}) wants GPU {index}, but "
                                  f"only {n_gpus} are visible; start at most {n_gpus} processes per machine "
                                  "(torchrun --nproc-per-node)")
        return torch.device("cuda", index)
    if name == "mps":
        if not _mps_available():
            raise TraitscopeError("--device mps: Apple's MPS backend is not available here; use --device cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise TraitscopeError(f"--device {name!r}: use one of auto, cpu, cuda, cuda:N, mps")


def _cuda_index(name: str) -> int:
    try:
        return torch.device(name).index or 0
    except RuntimeError:
        raise TraitscopeError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def backend_for(device: torch.device) -> str:
    """gloo for CPU tensors; on a GPU, NCCL for CUDA tensors and gloo for the small CPU objects."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def session(device: torch.device | str | None = None) -> Iterator[World]:
    """Join the process group described by the environment (if any) for the body, then leave it.

    Nested or repeated use is safe: a group that is already set up is used as it is and left alone.
    """
    env = env_world()
    if env.size == 1 or (tdist.is_available() and tdist.is_initialized()):
        yield world() if env.size > 1 else World()
        return
    if not tdist.is_available():
        raise TraitscopeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = torch.device(device) if device is not None else pick_device("auto", env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise TraitscopeError(f"WORLD_SIZE={env.size} but {name} is not set; launch with torchrun "
                                  "(see docs/distributed.md)")
    timeout = datetime.timedelta(minutes=_env_int(TIMEOUT_MIN_ENV, 60))
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    tdist.init_process_group(backend=backend_for(device), rank=env.rank, world_size=env.size, timeout=timeout,
                             **kwargs)
    try:
        yield World(env.rank, env.size, env.local_rank, env.local_size)
    finally:
        tdist.destroy_process_group()


# --- collectives that are no-ops for one process ---

def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def barrier() -> None:
    """Wait until every rank gets here."""
    if _active():
        tdist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank (small picklable objects)."""
    if not _active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (small picklable objects)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or 'mean', 'max', 'min') `tensor` over ranks, in place; returns it."""
    if not _active():
        return tensor
    ops = {"sum": tdist.ReduceOp.SUM, "mean": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX,
           "min": tdist.ReduceOp.MIN}
    tdist.all_reduce(tensor, op=ops[op])
    if op == "mean":
        tensor.div_(tdist.get_world_size())
    return tensor


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """(world size, *tensor.shape): every rank's `tensor` (same shape and dtype on every rank), in rank order."""
    if not _active():
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, tensor.contiguous())  # (the list form works on gloo as well as NCCL)
    return torch.stack(parts)


def any_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is true on any rank."""
    if not _active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def check_agree(what: str, value: Any) -> None:
    """Stop every rank with one clear line when the ranks computed different `value`s of `what`."""
    values = all_gather(value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise TraitscopeError(f"the processes of this job disagree on {what} (rank 0: {values[0]!r}, rank "
                              f"{differ[0]}: {values[differ[0]]!r}); every rank must see the same inputs")


def raise_if_any(error: BaseException | None) -> None:
    """Collective: every rank says whether it failed; if any did, every rank raises the first failure.

    A failing rank raises its own error; the others raise a TraitscopeError naming that rank, so no
    rank is left waiting at the next collective.
    """
    message = None if error is None else (str(error) or type(error).__name__)
    messages = all_gather(message)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, msg = failed[0]
        raise TraitscopeError(f"rank {rank} failed: {msg}")


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (a download into a shared cache, folders to create), the other ranks
    once it has succeeded; an error on any rank then stops every rank with its message."""
    is_main = world().is_main
    if not is_main:
        raise_if_any(None)  # rank 0's outcome
    error = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 (re-raised below, on every rank)
        error = err
    if is_main:
        raise_if_any(error)  # rank 0's outcome, to the others
    raise_if_any(None if is_main else error)  # the others' outcomes, to everyone


# --- printing and resources ---

def say(*args, file=None, **kwargs) -> None:
    """print() on rank 0 only."""
    rank = tdist.get_rank() if _active() else env_world().rank
    if rank == 0:
        print(*args, file=file or sys.stdout, flush=True, **kwargs)


def cpus_per_rank() -> int:
    """This machine's CPU cores shared among the processes launched on it."""
    n_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n_cpus // max(1, env_world().local_size))


__all__ = ["World", "env_world", "world", "check_joined", "pick_device", "backend_for", "session", "barrier",
           "broadcast", "all_gather", "all_gather_tensor", "any_true", "all_reduce_", "check_agree", "raise_if_any",
           "main_first", "say", "cpus_per_rank", "DEVICE_CHOICES"]
