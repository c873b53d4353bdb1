"""Where the truncated network runs: torch, or OpenVINO on the CPU.

OpenVINO runs the same network (the same timm/torchvision module, converted in this process) faster
than torch on a CPU (2.1x the plain torch network, 1.2x the batch-norm-folded one on the 2-core AVX2
host of BENCHMARKS.md) with float32 results equal to torch's to about 1e-6. The conversion happens
once per backbone, weights and input shape and is kept on disk (``$PADIM_CACHE/openvino``, never in
the model store): later processes only compile it.

:class:`OpenVinoNetwork` is a drop-in for the torch network of a :class:`~padim.core.backbones.Backbone`:
called with a ``(B, 3, S, S)`` float32 batch (normalised, channels-last), it returns the tapped maps
``(B, C_i, H_i, W_i)`` as channels-last float32 tensors, like the torch module. It is re-entrant:
each call takes an idle inference request from a pool (or creates one), so several threads can
run it at once.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from padim.errors import ConfigError
from padim.settings import Precision

if TYPE_CHECKING:
    import openvino


FORMAT_VERSION = "nhwc-1"
"""Version of the converted graph's interface (NHWC input and outputs); part of the cache key."""


def import_openvino() -> ModuleType:
    """Import OpenVINO with its usage telemetry off; every import of it in padim goes through here.

    ``import openvino`` imports its model converter, which sends a usage event at import time (and
    more on each conversion) unless the user opted out with a consent file in ``~/intel``. It sends
    from a *forked* process: in a process with running threads the fork can deadlock on a lock
    another thread held, the orphan keeps the parent's pipes open (a ``padim score`` stopped by
    SIGTERM left one behind, holding its caller for minutes), and it tries to reach the internet
    from a factory machine. The converter falls back to its own no-op stub when the
    ``openvino_telemetry`` package cannot be imported; an entry of None in :data:`sys.modules` is
    Python's documented way to make that import fail. Set before OpenVINO is first imported, it
    covers the import-time event and every later one; if another library imported the real package
    first, it is left alone (and :func:`disable_conversion_telemetry` still silences conversions).

    Returns:
        The ``openvino`` module.

    Raises:
        ImportError: OpenVINO is not installed.
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino

    return openvino


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    try:
        import_openvino()
    except ImportError:
        return False
    return True


def resolve_runtime(runtime: str, device: torch.device) -> Literal["torch", "openvino"]:
    """The runtime a backbone on ``device`` uses.

    Args:
        runtime: ``"auto"``, ``"torch"`` or ``"openvino"``.
        device: Where the network runs.

    Returns:
        ``"openvino"`` or ``"torch"``.

    Raises:
        ConfigError: For an unknown runtime, OpenVINO asked for on a GPU, or OpenVINO asked for
            but not installed.
    """
    if runtime not in ("auto", "torch", "openvino"):
        raise ConfigError(f"runtime must be 'auto', 'torch' or 'openvino', got {runtime!r}")
    if runtime == "torch":
        return "torch"
    if device.type != "cpu":
        if runtime == "openvino":
            raise ConfigError(f"the OpenVINO runtime runs on the CPU only; use --runtime torch on {device.type}")
        return "torch"
    if openvino_available():
        return "openvino"
    if runtime == "openvino":
        raise ConfigError("the OpenVINO runtime needs the openvino package: pip install openvino")
    return "torch"


def cache_root() -> Path:
    """Where converted networks are kept (``$PADIM_CACHE/openvino``, default ``~/.cache/padim``)."""
    return Path(os.environ.get("PADIM_CACHE", Path.home() / ".cache" / "padim")) / "openvino"


class _NhwcTaps(nn.Module):
    """The torch network with NHWC input and outputs (what the converted graph computes).

    NHWC on both sides lets the caller hand over a channels-last batch and take back channels-last
    maps without a copy.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        taps = self.network(images.permute(0, 3, 1, 2))
        return tuple(tap.permute(0, 2, 3, 1) for tap in taps)


@dataclass(frozen=True)
class CompileOptions:
    """How a converted network is compiled.

    Attributes:
        precision: ``"f32"`` (exact) or ``"bf16"``.
        threads: CPU threads of one inference.
    """

    precision: Precision = "f32"
    threads: int = 0

    def properties(self) -> dict[str, Any]:
        """OpenVINO compile properties."""
        properties: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": "LATENCY",
        }
        if self.threads > 0:
            properties["INFERENCE_NUM_THREADS"] = self.threads
        return properties


def check_precision(core: openvino.Core, precision: Precision) -> None:
    """Refuse a precision the CPU cannot run (OpenVINO would silently run float32 instead).

    Args:
        core: The OpenVINO core.
        precision: The requested arithmetic.

    Raises:
        ConfigError: For ``"bf16"`` on a CPU without bfloat16 support, naming the setting.
    """
    if precision != "bf16":
        return
    capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if "BF16" not in capabilities:
        raise ConfigError(
            f"precision='bf16' needs a CPU with bfloat16 support (AVX512-BF16 or AMX); this CPU offers "
            f"{capabilities}: use precision='f32' (--precision f32)"
        )


def cache_key(name: str, weights_sha256: str, batch: int, side: int) -> str:
    """Name of a converted network in the cache.

    Args:
        name: Backbone name.
        weights_sha256: Identity of the weights.
        batch: Images per call.
        side: Input side ``S``.

    Returns:
        A file-name-safe key that changes with any of them, the OpenVINO version and the graph format.
    """
    openvino = import_openvino()

    identity = f"{name}|{weights_sha256}|{batch}|{side}|{openvino.__version__}|{FORMAT_VERSION}"
    return f"{name}-{batch}x{side}-{hashlib.sha256(identity.encode()).hexdigest()[:20]}"


def disable_conversion_telemetry() -> None:
    """Replace the telemetry of OpenVINO's model converter by OpenVINO's own no-op stub.

    ``openvino.convert_model`` sends usage telemetry unless the user opted out (a consent file in
    ``~/intel``), and it sends it from a *forked* process: in a process with running threads the
    fork can deadlock on a lock another thread held, and the orphan keeps the parent's pipes open
    (a score run killed right after converting left one behind, holding its test for 10 minutes);
    it also tries to reach the internet from a factory machine. The converter's modules fall back to
    the stub when the telemetry package is missing; this makes that choice explicitly, also where
    another library imported the package before :func:`import_openvino` could keep it out. Idempotent.
    """
    from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils, utils

    for module in (convert_impl, telemetry_utils, utils):
        module.tm = telemetry_stub  # type: ignore[attr-defined]


def convert_network(network: nn.Module, batch: int, side: int, target: Path) -> None:
    """Convert a torch network to OpenVINO IR at ``target`` (``.xml`` + ``.bin``), atomically.

    The IR is written under temporary names and renamed into place (the weights file first), so
    a reader never sees half of it and two processes converting at once both end with a whole one.

    Args:
        network: The truncated torch network, on the CPU, in eval mode.
        batch: Images per call (a static shape compiles to the fastest kernels).
        side: Input side.
        target: Path of the ``.xml`` file.
    """
    openvino = import_openvino()

    disable_conversion_telemetry()
    example = torch.zeros(batch, side, side, 3)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warnings about shape-dependent Python (TF "same" padding)
        wrapper = _NhwcTaps(network)
        wrapper.eval()
        converted = openvino.convert_model(wrapper, example_input=example, input=[example.shape])
    target.parent.mkdir(parents=True, exist_ok=True)
    stem = target.parent / f".{target.stem}-{uuid.uuid4().hex}"
    temporary = stem.with_suffix(".xml")
    openvino.save_model(converted, temporary, compress_to_fp16=False)  # keep the float32 weights
    os.replace(temporary.with_suffix(".bin"), target.with_suffix(".bin"))
    os.replace(temporary, target)


class OpenVinoNetwork:
    """A truncated network run by OpenVINO on the CPU; called like the torch module it comes from.

    Networks are compiled on first use for each input shape (micro-batch, side) and kept; calls
    with fewer images than the compiled micro-batch are padded with zeros (the padding's outputs
    are dropped).

    Args:
        network: The torch network (kept for converting new shapes).
        name: Backbone name.
        weights_sha256: Identity of its weights.
        options: Compile options.
        micro_batch: Images per compiled call (the extractor's CPU micro-batch).
    """

    def __init__(
        self, network: nn.Module, name: str, weights_sha256: str, options: CompileOptions, micro_batch: int
    ) -> None:
        openvino = import_openvino()

        self.torch_network = network
        self.micro_batch = micro_batch
        self.name = name
        self.weights_sha256 = weights_sha256
        self.options = options
        self._core = openvino.Core()
        check_precision(self._core, options.precision)
        self._compiled: dict[tuple[int, int], tuple[Any, queue.SimpleQueue[Any]]] = {}
        self._lock = threading.Lock()

    def compiled(self, batch: int, side: int) -> tuple[openvino.CompiledModel, queue.SimpleQueue[Any]]:
        """The compiled network for ``batch`` images of side ``side`` and its idle requests.

        Converted (once per machine) and compiled (once per process) on first use.
        """
        key = (batch, side)
        with self._lock:
            if key not in self._compiled:
                path = cache_root() / f"{cache_key(self.name, self.weights_sha256, batch, side)}.xml"
                if not (path.is_file() and path.with_suffix(".bin").is_file()):
                    convert_network(self.torch_network, batch, side, path)
                model = self._core.read_model(path)
                compiled = self._core.compile_model(model, "CPU", self.options.properties())
                self._compiled[key] = (compiled, queue.SimpleQueue())
            return self._compiled[key]

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tap a batch.

        Args:
            images: Shape ``(B, 3, S, S)``, normalised float32 (any memory format).

        Returns:
            Float32 maps ``(B, C_i, H_i, W_i)`` of every tap (channels-last memory), shallow first.
        """
        count, side = images.shape[0], images.shape[-1]
        if images.shape[-2] != side:
            raise ValueError(f"the OpenVINO runtime takes square inputs, got {tuple(images.shape)}")
        batch = max(count, self.micro_batch)
        compiled, idle = self.compiled(batch, side)
        rows = images.permute(0, 2, 3, 1).float()  # NHWC; a view of a channels-last batch
        if count < batch:
            rows = torch.cat([rows, rows.new_zeros(batch - count, *rows.shape[1:])])
        rows = rows.contiguous()
        try:
            request = idle.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            outputs = request.infer({0: rows.numpy()}, share_inputs=True)
            taps = [torch.from_numpy(outputs[output]) for output in compiled.outputs]  # copies (share_outputs off)
        finally:
            idle.put(request)
        return [tap[:count].permute(0, 3, 1, 2) for tap in taps]
