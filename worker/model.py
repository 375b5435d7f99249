"""Sequential models declared as plain data, so a job spec can travel to any stateless worker.

    model = Sequential.from_spec([{"type": "dense", "units": 64, "activation": "relu"},
                                  {"type": "dense", "units": 10}], input_shape=(64,))
    params = model.init_params(seed=0)
    loss, grads, n_correct = model.loss_and_grads(np, params, x, y, "softmax_cross_entropy")

Global parameter names are "{index}.{type}.{local}", e.g. "0.dense.w", "2.conv2d.b".

A model whose first layer reads ids (embedding, sparse_linear) also has a sparse table, named the
same way ("0.embedding.rows"), that is no parameter: per batch the worker pulls only the rows it needs.

    ids, local_x = model.gather(xp, x)                  # x: int64 (n, slots), -1 for an empty slot
    params["0.embedding.rows"] = rows                   # pulled for ids, in their order: (len(ids), width)
    loss, grads, n_correct = model.loss_and_grads(xp, params, local_x, y, "binary_cross_entropy")
    # grads["0.embedding.rows"]: (len(ids), width), to push for ids
"""

from __future__ import annotations

import copy

import numpy as np

from ps.worker import kernels
from ps.worker.layers import LAYERS, Layer, Table
from ps.worker.losses import LOSSES, get_loss, validate_loss_for_output
from ps.worker.xp import asarray, make_rng, to_numpy

__all__ = ["Sequential", "validate_loss_for_output", "LOSSES"]


class Sequential:
    """Layers applied in order to inputs of ``input_shape`` (no batch axis)."""

    def __init__(self, layers: list[Layer], input_shape: tuple[int, ...], spec: list[dict] | None = None,
                 loss: str | None = None):
        self.layers = list(layers)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.spec = copy.deepcopy(spec) if spec is not None else None
        self.loss = loss
        self._names: list[dict[str, str]] = []      # per layer: local name -> global name (tables too)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._inits: dict[str, str] = {}
        self._tables: dict[str, Table] = {}         # sparse tables by global name
        shape = self.input_shape
        for i, layer in enumerate(self.layers):
            if i > 0 and layer.reads_ids:
                raise ValueError(f"layer {i}: {layer.type} must be the first layer: it reads ids")
            try:
                local = layer.param_shapes(shape)
                out = layer.output_shape(shape)
            except ValueError as e:
                raise ValueError(f"layer {i}: {e}") from None
            names = {}
            kinds = layer.initializers()
            for k, s in local.items():
                name = f"{i}.{layer.type}.{k}"
                names[k] = name
                self._shapes[name] = tuple(int(d) for d in s)
                self._inits[name] = kinds.get(k, "zeros")
            for k, table in layer.tables().items():
                names[k] = f"{i}.{layer.type}.{k}"
                self._tables[names[k]] = table
            self._names.append(names)
            shape = tuple(int(d) for d in out)
        self.output_shape = shape
        self.reads_ids = bool(self.layers) and self.layers[0].reads_ids
        #: whether training draws random numbers (dropout): only then is a generator built for a step
        self.random = any(getattr(layer, "random", False) for layer in self.layers)
        if loss is not None:
            validate_loss_for_output(loss, self.output_shape)

    @classmethod
    def from_spec(cls, spec: list[dict], input_shape, loss: str | None = None) -> "Sequential":
        """Build from a list of layer dicts; ValueError names the layer index and what is wrong with it.

        With ``loss``, also check that the output fits it (and let ``predict`` know what to return).
        """
        if not isinstance(spec, (list, tuple)) or not spec:
            raise ValueError(f"expected a non-empty list of layers, got {spec!r}")
        shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else (input_shape,)
        if not shape or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                                for d in shape):
            raise ValueError(f"input_shape: expected a non-empty tuple of positive ints, got {input_shape!r}")
        layers = []
        for i, entry in enumerate(spec):
            if not isinstance(entry, dict) or "type" not in entry:
                raise ValueError(f"layer {i}: expected a dict with a 'type' field, got {entry!r}")
            kind = entry["type"]
            if not isinstance(kind, str) or kind not in LAYERS:
                raise ValueError(f"layer {i}: unknown layer type {kind!r}: expected one of {', '.join(LAYERS)}")
            try:
                layers.append(LAYERS[kind].from_config(entry))
            except ValueError as e:
                raise ValueError(f"layer {i}: {e}") from None
            except TypeError as e:  # a field value of a type no validator expected
                raise ValueError(f"layer {i}: {kind}: {e}") from None
        return cls(layers, shape, spec=list(spec), loss=loss)

    def to_spec(self) -> list[dict]:
        """The plain list of layer dicts this model was built from."""
        if self.spec is None:
            raise ValueError("this model was not built from a spec")
        return copy.deepcopy(self.spec)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's shape by global name, in layer order."""
        return dict(self._shapes)

    def initializers(self, seed: int, dtype=np.float32) -> dict:
        """The ``ps.initializers.Init`` of every parameter: glorot_uniform for dense weights,
        he_normal for conv weights, zeros for biases."""
        from ps.initializers import Init
        return {name: Init(self._inits[name], shape, np.dtype(dtype).name, seed=int(seed))
                for name, shape in self._shapes.items()}

    def tables(self, seed: int = 0, dtype=np.float32) -> dict:
        """The ``ps.SparseTable`` of every sparse table by global name (none for a model whose first
        layer reads no ids): embedding rows start normal(0, init_std) from ``seed``, others at zeros."""
        from ps.initializers import Init
        from ps.sparse import SparseTable
        dtype = np.dtype(dtype).name
        return {name: SparseTable(t.width, Init(t.init, (t.width,), dtype, seed=int(seed), std=t.std), dtype=dtype)
                for name, t in self._tables.items()}

    def gather(self, xp, x):
        """(ids, local_x) for a batch of id inputs ``x`` (integers (n, *input_shape), -1 for an empty slot):
        ``ids`` the distinct ids other than -1, sorted (host int64, the rows to pull), and ``local_x`` ``x``
        as positions in ``ids`` (an int64 ``xp`` array of the shape of ``x``, -1 kept), the input that
        ``forward``, ``loss_and_grads`` and ``predict`` take."""
        if not self.reads_ids:
            raise ValueError(f"gather: the first layer ({self.layers[0].type}) reads features, not ids: "
                             f"this model has no sparse table")
        if not hasattr(x, "dtype"):
            x = np.asarray(x)
        if x.dtype.kind not in "iu":
            raise ValueError(f"gather: ids must be integers, got {x.dtype}")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"gather: ids of shape {tuple(x.shape)}, expected (n, "
                             f"{', '.join(map(str, self.input_shape))})")
        if x.dtype == np.uint64 and x.size and int(x.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"gather: id {int(x.max())} is outside the int64 range")
        ids, local_x = kernels.unique_ids(xp, asarray(xp, x, np.int64))
        return to_numpy(ids), local_x

    def init_params(self, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
        """Seeded initial parameters (NumPy), identical to what a server computes from ``initializers``."""
        from ps.initializers import full
        return {name: full(init, name) for name, init in self.initializers(seed, dtype).items()}

    def _forward(self, xp, params, x, train: bool, rng):
        caches = []
        for layer, names in zip(self.layers, self._names):
            local = {k: params[g] for k, g in names.items()}
            x, cache = layer.forward(xp, local, x, train, rng)
            caches.append(cache)
        return x, caches

    def forward(self, xp, params: dict, x, train: bool = False, rng_seed: int = 0):
        """Model outputs (logits for the classification losses) for a batch ``x``.

        For a model that reads ids, ``x`` is ``local_x`` of ``gather`` and ``params`` holds, under each
        table's name, the rows of ``gather``'s ids in their order: (len(ids), width).
        """
        rng = make_rng(xp, rng_seed) if train and self.random else None
        return self._forward(xp, params, x, train, rng)[0]

    def loss_and_grads(self, xp, params: dict, x, y, loss: str, train: bool = True, rng_seed: int = 0,
                       lazy: bool = False):
        """(mean loss as a float, grads by global name in the dtype of each parameter, n_correct or None).

        Inputs as for ``forward``; grads hold every parameter, then each table's rows: (len(ids), width),
        the gradients of a repeated id summed. ``lazy`` as in ``ps.worker.losses``: on CuPy the loss and
        count stay on the device, and nothing here waits for it.
        """
        loss_fn = get_loss(loss)
        rng = make_rng(xp, rng_seed) if train and self.random else None
        out, caches = self._forward(xp, params, x, train, rng)
        value, grad, n_correct = loss_fn(xp, out, y, lazy)
        grads = {}
        for i in range(len(self.layers) - 1, -1, -1):
            layer, names = self.layers[i], self._names[i]
            local = {k: params[g] for k, g in names.items()}
            # The first layer's input gradient is never used: skip it (saves a col2im for CNNs).
            grad, local_grads = layer.backward(xp, local, caches[i], grad, need_input_grad=i > 0)
            for k, g in local_grads.items():
                grads[names[k]] = g.astype(params[names[k]].dtype, copy=False)
        return value, {name: grads[name] for name in (*self._shapes, *self._tables)}, n_correct

    def predict(self, xp, params: dict, x, loss: str | None = None):
        """Class ids (softmax cross-entropy), 0/1 (binary cross-entropy) or values (MSE).

        Without ``loss`` (here or at ``from_spec``): class ids for more than one output, values for one.
        Inputs as for ``forward``.
        """
        loss = loss or self.loss
        out = self.forward(xp, params, x, train=False)
        if loss is None:
            loss = "softmax_cross_entropy" if out.ndim == 2 and out.shape[1] > 1 else "mse"
        get_loss(loss)
        if loss == "softmax_cross_entropy":
            return out.argmax(axis=1)
        if loss == "binary_cross_entropy":
            return (out.reshape(len(out), -1)[:, 0] > 0).astype(np.int64)
        return out

    def __repr__(self) -> str:
        return f"Sequential({[layer.type for layer in self.layers]}, input_shape={self.input_shape})"
