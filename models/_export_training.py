"""Turn a PyTorch model into a training package (needs the ``export`` extra: torch).

Each block becomes a forward graph and a vector-Jacobian graph traced with
``torch.func.vjp`` through ``make_fx`` and written by the dynamo ONNX exporter; the
parameters are graph inputs, so the optimiser can live in numpy on any node and the
nodes never need torch. The batch dimension is dynamic: micro-batches of any size run
through the same graphs.
"""

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import InvalidModelError
from ._training import (
    PARAMS_FILE,
    TrainingFragment,
    TrainingPackage,
    qualified,
    write_manifest,
    write_params,
)


def export_training(
    blocks: "Sequence[Any]",
    loss: "Callable[[Any, Any], Any]",
    example_input: Any,
    example_labels: Any,
    folder: Path,
) -> TrainingPackage:
    """Write ``blocks`` (torch modules run one after another) as a training package.

    ``loss(output, labels)`` must reduce to a scalar mean over the batch, so that
    micro-batch gradients weighted by their size add up to the batch's gradient.
    """
    import torch
    from torch.func import functional_call, vjp

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch")
    fragments: list[TrainingFragment] = []
    flat: dict[str, np.ndarray] = {}
    x = example_input
    last = len(blocks) - 1
    for index, block in enumerate(blocks):
        names = [n.replace(".", "_") for n, _ in block.named_parameters()]
        originals = [n for n, _ in block.named_parameters()]
        params = tuple(p.detach().clone() for _, p in block.named_parameters())
        for name, value in zip(names, params, strict=True):
            flat[qualified(index, name)] = value.numpy()

        def run(
            ps: tuple[Any, ...], inp: Any, block: Any = block, keys: list[str] = originals
        ) -> Any:
            return functional_call(block, dict(zip(keys, ps, strict=True)), (inp,))

        def forward(*args: Any, run: Any = run) -> Any:
            *ps, inp = args
            return run(tuple(ps), inp)

        with torch.no_grad():
            y = forward(*params, x)
        grads_of = [f"grad.{n}" for n in names]
        wants_input_grad = index > 0
        backward: Callable[..., Any]
        if index < last:

            def through(*args: Any, run: Any = run, want: bool = wants_input_grad) -> Any:
                *ps, inp, grad_y = args
                pull: Any = vjp(run, tuple(ps), inp)[1]
                grad_ps, grad_x = pull(grad_y)
                return (*grad_ps, grad_x) if want else tuple(grad_ps)

            backward = through
            extra, extra_names, outputs = [torch.ones_like(y)], ["grad_y"], grads_of
        else:

            def with_loss(
                *args: Any, run: Any = run, want: bool = wants_input_grad, loss: Any = loss
            ) -> Any:
                *ps, inp, labels = args
                traced: Any = vjp(lambda w, i: loss(run(w, i), labels), tuple(ps), inp)
                value, pull = traced
                grad_ps, grad_x = pull(torch.ones_like(value))
                return (value, *grad_ps, grad_x) if want else (value, *grad_ps)

            backward = with_loss
            extra, extra_names, outputs = [example_labels], ["labels"], ["loss", *grads_of]
        if wants_input_grad:
            outputs = [*outputs, "grad_x"]
        stem = f"f{index}"
        _export(
            forward,
            (*params, x),
            [*names, "x"],
            ["y"],
            folder / f"{stem}.forward.onnx",
            len(params),
            batch,
        )
        _export(
            backward,
            (*params, x, *extra),
            [*names, "x", *extra_names],
            outputs,
            folder / f"{stem}.backward.onnx",
            len(params),
            batch,
        )
        fragments.append(TrainingFragment(f"{stem}.forward.onnx", f"{stem}.backward.onnx", names))
        x = y
    write_params(folder / PARAMS_FILE, flat)
    package = TrainingPackage(folder=folder, fragments=fragments)
    write_manifest(package)
    return package


def _export(
    function: Callable[..., Any],
    args: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    path: Path,
    param_count: int,
    batch: Any,
) -> None:
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    traced = make_fx(function, tracing_mode="symbolic")(*args)
    dynamic = [None] * param_count + [{0: batch}] * (len(args) - param_count)
    with warnings.catch_warnings():  # the exporter's own deprecation chatter
        warnings.simplefilter("ignore")
        _quiet_exporter_logs()
        torch.onnx.export(
            traced,
            args,
            str(path),
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=tuple(dynamic),
            external_data=False,
            verbose=False,
        )
    _verify(function, args, param_count, path)


def _verify(
    function: Callable[..., Any], args: tuple[Any, ...], param_count: int, path: Path
) -> None:
    """Run the written graph on half the example batch and compare with torch.

    The exporter has mistranslated ops before (``nll_loss_backward`` dropping its
    divisor), and a shape baked in as a constant shows only at another batch size.
    """
    import onnxruntime as ort

    half = max(1, len(args[param_count]) // 2)
    sample = (*args[:param_count], *(a[:half] for a in args[param_count:]))
    expected = function(*sample)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), sample, strict=True)}
    for got, want in zip(session.run(None, feeds), expected, strict=True):
        want = want.detach().numpy()
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise InvalidModelError(
                f"{path.name}: the exported graph disagrees with torch "
                f"(max difference {np.abs(got - want).max():.3g}); rewrite the op it mistranslates"
            )


def _quiet_exporter_logs() -> None:
    """The exporter logs a warning per torchvision op it cannot register; we use none."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
