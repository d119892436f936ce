"""A native forest runtime for serving: scikit-learn's own trees, evaluated by a small C kernel built in-process.

Where the trees come from. The registry keeps two files per trained model: the ONNX graph (portable, served by ONNX
Runtime) and the scikit-learn forest as a joblib file. ONNX stores thresholds and leaf values as float32, so its
probabilities differ from scikit-learn's by up to about 1e-7; the joblib file holds them in float64. This module reads
that file, after its sha256 matched the registry, with a restricted unpickler that never imports or calls anything of
the file's choosing: the only globals it resolves are the forest, tree and array records scikit-learn and joblib
write, each mapped to an inert stand-in that only holds data, plus numpy's dtype and scalar constructors. The node
arrays are then checked (shapes, child indices, feature indices, acyclic) before anything is built from them.

What it computes. Exactly scikit-learn's `RandomForestClassifier.predict_proba` with one job: X cast to float32, a
row goes left when x <= threshold (the float64 threshold is replaced by the largest float32 not above it, which
makes the float32 comparison exact), a NaN goes where the node's `missing_go_to_left` says, and each row's leaf
values (float64) are added tree after tree from zero and divided by the number of trees. A row's result does not
depend on the batch it is in.

How it runs. Trees of depth <= `COMPLETE_MAX_DEPTH` are padded to complete trees (a leaf above the full depth is
copied into all its descendants) and walked branch-free: blocks of 128 rows go through the forest tree by tree (a
tree's nodes and leaves stay in the L1 cache), eight rows walking a tree together, each row's class sums in its own
vector lanes, kept in registers over eight trees at a time; deeper trees and rows holding a NaN go through the
trees' own node arrays. The C kernel (`KERNEL_SOURCE`) is compiled once per process with the system C compiler into
a private temporary directory; the library's sha256 is taken right after the build and checked again immediately
before it is loaded, and no other native code is ever loaded by this module. Without a compiler, a kernel built
ahead of time (`build_prebuilt`, `python -m shared.forest_runtime --build-prebuilt DIR`, as the Docker image does)
is loaded from PREBUILT_DIR only if its record names this source's sha256 and the library's sha256 matches it, and
the files belong to root and are writable by root only; otherwise `NativeUnavailable` says why (the model store then
serves through ONNX Runtime, or refuses when native execution was demanded). Calls release the GIL, so concurrent
predictions run in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import stat
import subprocess
import tempfile
import threading
import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

log = logging.getLogger(__name__)

#: Trees at most this deep are padded to complete trees (2**depth leaves each); deeper ones are walked node by node.
COMPLETE_MAX_DEPTH = 10
#: Most classes the kernel accumulates per row.
MAX_CLASSES = 8
#: Largest decompressed joblib file read (bytes).
MAX_ARTIFACT_BYTES = 1 << 30
#: Flags the kernel is built with: no fast-math and no contraction, so every addition is the IEEE one.
CFLAGS = ("-O3", "-march=native", "-fno-fast-math", "-ffp-contract=off", "-fPIC", "-shared", "-std=c99")

KERNEL_SOURCE = r"""
/* Random-forest evaluation over a flat layout of fitted scikit-learn trees (see shared/forest_runtime.py).
 *
 * A split sends a float32 x left when x <= threshold (thresholds are the largest float32 not above scikit-learn's
 * float64 ones, so this is scikit-learn's comparison), a NaN where the node's missing_left says. A row's class
 * probabilities are its leaves' float64 values added tree after tree from zero, then divided by the number of
 * trees, as RandomForestClassifier.predict_proba does with one job; each row is computed on its own, so its result
 * does not depend on the batch.
 *
 * Trees of depth <= D are also stored complete (a leaf above depth D copied into all its descendants), nodes in
 * breadth-first order: a step is idx = 2*idx + 1 + !(x <= t), without branches, and ROWS rows walk a tree together.
 * Rows holding a NaN, and all rows of deeper forests, walk the trees' own node arrays.
 */
#include <math.h>
#include <stdint.h>

#define ROWS 8
#define MAXC 8
#define RB 128

typedef struct {
    float threshold;
    int32_t offset; /* the split feature's byte offset in a row: 4 * feature */
} node_t;

typedef struct {
    int64_t n_features, n_trees, n_classes, depth; /* depth < 0: no complete layout */
    int64_t leaf_stride;        /* doubles per leaf in c_leaf: n_classes padded to 4 or 8 with zeros */
    const node_t *c_node;       /* [n_trees][2^depth - 1] */
    const double *c_leaf;       /* [n_trees][2^depth][leaf_stride] */
    const int64_t *offset;      /* [n_trees + 1]: tree t's nodes are offset[t] .. offset[t+1]-1, its root first */
    const int64_t *tree_depth;  /* [n_trees] */
    const int32_t *left;        /* children within the tree; a leaf is its own left and right child */
    const int32_t *right;
    const int32_t *feature;
    const float *threshold;
    const uint8_t *missing_left;
    const double *value;        /* [n_nodes][n_classes] */
} forest_t;

static inline int64_t step(const forest_t *m, int64_t base, int64_t i, const float *xr)
{
    /* Leaves are their own children (left == right == the leaf), so stepping from a leaf stays on it. */
    const int64_t j = base + i;
    const float xv = xr[m->feature[j]];
    const int go_left = (xv <= m->threshold[j]) | ((xv != xv) & (m->missing_left[j] != 0));
    return go_left ? m->left[j] : m->right[j];
}

static void row_nodes(const forest_t *m, const float *xr, double *out)
{
    const int64_t k = m->n_classes;
    double acc[MAXC];
    for (int64_t c = 0; c < k; c++)
        acc[c] = 0.0;
    for (int64_t t = 0; t < m->n_trees; t++) {
        const int64_t base = m->offset[t];
        int64_t i = 0;
        for (int64_t s = 0; s < m->tree_depth[t]; s++)
            i = step(m, base, i, xr);
        const double *lv = m->value + (base + i) * k;
        for (int64_t c = 0; c < k; c++)
            acc[c] += lv[c];
    }
    for (int64_t c = 0; c < k; c++)
        out[c] = acc[c] / (double)m->n_trees;
}

static void block_nodes(const forest_t *m, const float *x, int64_t nf, double *out)
{
    const int64_t k = m->n_classes;
    double acc[ROWS][MAXC];
    for (int b = 0; b < ROWS; b++)
        for (int64_t c = 0; c < k; c++)
            acc[b][c] = 0.0;
    for (int64_t t = 0; t < m->n_trees; t++) {
        const int64_t base = m->offset[t];
        int64_t idx[ROWS];
        for (int b = 0; b < ROWS; b++)
            idx[b] = 0;
        for (int64_t s = 0; s < m->tree_depth[t]; s++)
            for (int b = 0; b < ROWS; b++)
                idx[b] = step(m, base, idx[b], x + b * nf);
        for (int b = 0; b < ROWS; b++) {
            const double *lv = m->value + (base + idx[b]) * k;
            for (int64_t c = 0; c < k; c++)
                acc[b][c] += lv[c];
        }
    }
    for (int b = 0; b < ROWS; b++)
        for (int64_t c = 0; c < k; c++)
            out[b * k + c] = acc[b][c] / (double)m->n_trees;
}

static void row_complete(const forest_t *m, const float *xr, double *out)
{
    const int64_t k = m->n_classes, d = m->depth;
    const int64_t n_inner = ((int64_t)1 << d) - 1, n_leaves = (int64_t)1 << d;
    double acc[MAXC];
    for (int64_t c = 0; c < k; c++)
        acc[c] = 0.0;
    for (int64_t t = 0; t < m->n_trees; t++) {
        const node_t *nd = m->c_node + t * n_inner;
        uint32_t i = 0;
        for (int64_t s = 0; s < d; s++)
            i = 2 * i + 1 + (uint32_t)!(xr[nd[i].offset / 4] <= nd[i].threshold);
        const double *lv = m->c_leaf + (t * n_leaves + (i - n_inner)) * m->leaf_stride;
        for (int64_t c = 0; c < k; c++)
            acc[c] += lv[c];
    }
    for (int64_t c = 0; c < k; c++)
        out[c] = acc[c] / (double)m->n_trees;
}

static int has_nan(const float *x, int64_t n)
{
    int any = 0;
    for (int64_t i = 0; i < n; i++)
        any |= isnan(x[i]);
    return any;
}

typedef double v4d __attribute__((vector_size(32)));

static inline v4d load4(const double *p)
{
    v4d v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

/* Rows of a block (at most RB) walk the trees tree by tree, so one tree's nodes and leaves stay in the L1 cache
 * while every row of the block passes through it; ROWS rows walk together. Each row's sums are its own vector
 * lanes (one per class), added tree after tree. The block's rows are first copied to a stride of S floats (S a
 * constant >= n_features), so a row's feature is one load at a constant offset. */
#define TC 8 /* trees a group of rows walks before its sums go back to memory */
#define BLOCK_S(S, LS)                                                                                    \
static void block_complete_##S##_##LS(const forest_t *m, const float *x, int64_t n, double *out)         \
{                                                                                                         \
    const int64_t nf = m->n_features, k = m->n_classes, d = m->depth, T = m->n_trees;                    \
    const int64_t n_inner = ((int64_t)1 << d) - 1, n_leaves = (int64_t)1 << d;                            \
    float xp[RB * S];                                                                                     \
    v4d acc[RB][LS / 4];                                                                                  \
    const v4d zero = {0.0, 0.0, 0.0, 0.0};                                                                \
    for (int64_t r = 0; r < n; r++) {                                                                     \
        for (int64_t j = 0; j < nf; j++)                                                                  \
            xp[r * S + j] = x[r * nf + j];                                                                \
        for (int j = 0; j < LS / 4; j++)                                                                  \
            acc[r][j] = zero;                                                                             \
    }                                                                                                     \
    for (int64_t t0 = 0; t0 < T; t0 += TC) {                                                              \
        const int64_t t1 = t0 + TC < T ? t0 + TC : T;                                                     \
        int64_t r = 0;                                                                                    \
        for (; r + ROWS <= n; r += ROWS) {                                                                \
            const char *xr = (const char *)(xp + r * S);                                                  \
            v4d a[ROWS][LS / 4];                                                                          \
            for (int b = 0; b < ROWS; b++)                                                                \
                for (int j = 0; j < LS / 4; j++)                                                          \
                    a[b][j] = acc[r + b][j];                                                              \
            for (int64_t t = t0; t < t1; t++) {                                                           \
                const node_t *nd = m->c_node + t * n_inner;                                               \
                const double *v = m->c_leaf + t * n_leaves * LS;                                          \
                uint64_t idx[ROWS];                                                                       \
                for (int b = 0; b < ROWS; b++)                                                            \
                    idx[b] = 0;                                                                           \
                for (int64_t s = 0; s < d; s++)                                                           \
                    for (int b = 0; b < ROWS; b++) {                                                      \
                        const node_t *q = nd + idx[b];                                                    \
                        float xv;                                                                         \
                        __builtin_memcpy(&xv, xr + (int64_t)b * S * 4 + (int64_t)q->offset, 4);           \
                        idx[b] = 2 * idx[b] + 1 + (uint64_t)!(xv <= q->threshold);                        \
                    }                                                                                     \
                for (int b = 0; b < ROWS; b++)                                                            \
                    for (int j = 0; j < LS / 4; j++)                                                      \
                        a[b][j] += load4(v + ((int64_t)idx[b] - n_inner) * LS + 4 * j);                   \
            }                                                                                             \
            for (int b = 0; b < ROWS; b++)                                                                \
                for (int j = 0; j < LS / 4; j++)                                                          \
                    acc[r + b][j] = a[b][j];                                                              \
        }                                                                                                 \
        for (; r < n; r++) {                                                                              \
            const float *xr = xp + r * S;                                                                 \
            for (int64_t t = t0; t < t1; t++) {                                                           \
                const node_t *nd = m->c_node + t * n_inner;                                               \
                const double *v = m->c_leaf + t * n_leaves * LS;                                          \
                uint32_t i = 0;                                                                           \
                for (int64_t s = 0; s < d; s++)                                                           \
                    i = 2 * i + 1 + (uint32_t)!(xr[nd[i].offset / 4] <= nd[i].threshold);                 \
                for (int j = 0; j < LS / 4; j++)                                                          \
                    acc[r][j] += load4(v + ((int64_t)i - n_inner) * LS + 4 * j);                          \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
    for (int64_t r = 0; r < n; r++)                                                                       \
        for (int64_t c = 0; c < k; c++)                                                                   \
            out[r * k + c] = acc[r][c / 4][c % 4] / (double)T;                                            \
}

BLOCK_S(16, 4)
BLOCK_S(32, 4)
BLOCK_S(64, 4)
BLOCK_S(128, 4)
BLOCK_S(16, 8)
BLOCK_S(32, 8)
BLOCK_S(64, 8)
BLOCK_S(128, 8)

void forest_predict(const forest_t *m, const float *x, int64_t n_rows, double *out)
{
    const int64_t nf = m->n_features, k = m->n_classes, d = m->depth;
    if (d < 0) {
        int64_t r = 0;
        for (; r + ROWS <= n_rows; r += ROWS)
            block_nodes(m, x + r * nf, nf, out + r * k);
        for (; r < n_rows; r++)
            row_nodes(m, x + r * nf, out + r * k);
        return;
    }
    for (int64_t r0 = 0; r0 < n_rows; r0 += RB) {
        const int64_t n = n_rows - r0 < RB ? n_rows - r0 : RB;
        const float *xb = x + r0 * nf;
        double *ob = out + r0 * k;
        if (n < ROWS || nf > 128) {
            for (int64_t r = 0; r < n; r++)
                row_complete(m, xb + r * nf, ob + r * k);
        } else if (m->leaf_stride == 4) {
            if (nf <= 16)
                block_complete_16_4(m, xb, n, ob);
            else if (nf <= 32)
                block_complete_32_4(m, xb, n, ob);
            else if (nf <= 64)
                block_complete_64_4(m, xb, n, ob);
            else
                block_complete_128_4(m, xb, n, ob);
        } else {
            if (nf <= 16)
                block_complete_16_8(m, xb, n, ob);
            else if (nf <= 32)
                block_complete_32_8(m, xb, n, ob);
            else if (nf <= 64)
                block_complete_64_8(m, xb, n, ob);
            else
                block_complete_128_8(m, xb, n, ob);
        }
        if (has_nan(xb, n * nf))  /* rows holding a NaN: again, node by node */
            for (int64_t r = 0; r < n; r++)
                if (has_nan(xb + r * nf, nf))
                    row_nodes(m, xb + r * nf, ob + r * k);
    }
}
"""


class ForestArtifactError(Exception):
    """The scikit-learn artifact cannot be read as a forest this runtime serves; the message says what is wrong."""


class NativeUnavailable(Exception):
    """The native kernel cannot be built or loaded here (e.g. no C compiler); the message says why."""


# -- reading the joblib file ----------------------------------------------------------------------------------------
class _Record:
    """An inert stand-in for a pickled object: it only holds the attributes the file gave it."""

    kind = "object"

    def __init__(self, *args: object) -> None:
        self.args = args

    def __repr__(self) -> str:
        return f"<{self.kind}>"


class _ForestRecord(_Record):
    kind = "RandomForestClassifier"


class _TreeEstimatorRecord(_Record):
    kind = "DecisionTreeClassifier"


class _TreeRecord(_Record):
    kind = "Tree"


class _NdarrayMarker(_Record):
    kind = "ndarray"


class _ArrayRecord(_Record):
    """joblib's NumpyArrayWrapper: its state says what follows it in the file, raw array bytes, read here."""

    kind = "NumpyArrayWrapper"
    _stream: ClassVar[io.BytesIO]
    array: np.ndarray

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict):
            raise ForestArtifactError("an array record's state is not a dict")
        dtype, shape, order = state.get("dtype"), state.get("shape"), state.get("order", "C")
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise ForestArtifactError(f"an array of dtype {dtype!r} is not plain data")
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ForestArtifactError(f"an array shape {shape!r} is not a tuple of sizes")
        count = 1
        for n in shape:
            count *= n
        size = count * dtype.itemsize
        if size > MAX_ARTIFACT_BYTES:
            raise ForestArtifactError(f"an array of {count} items is larger than any forest artifact")
        stream = self._stream
        if state.get("numpy_array_alignment_bytes") is not None:
            pad = stream.read(1)
            if len(pad) != 1:
                raise ForestArtifactError("the file ends inside an array")
            stream.seek(pad[0], io.SEEK_CUR)
        data = stream.read(size)
        if len(data) != size:
            raise ForestArtifactError("the file ends inside an array")
        arr = np.frombuffer(data, dtype=dtype, count=count)
        arr = arr.reshape(shape[::-1]).T if order == "F" else arr.reshape(shape)
        self.array = arr.astype(arr.dtype.newbyteorder("="), copy=False)


def _scalar(dtype: object, data: object = None) -> object:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise ForestArtifactError(f"a numpy scalar of dtype {dtype!r} is not plain data")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _dtype(*args: object) -> np.dtype:
    if not args or not isinstance(args[0], str):
        raise ForestArtifactError(f"numpy dtype arguments {args!r} are not a type code")
    return np.dtype(args[0])


_GLOBALS: dict[tuple[str, str], object] = {
    ("sklearn.ensemble._forest", "RandomForestClassifier"): _ForestRecord,
    ("sklearn.tree._classes", "DecisionTreeClassifier"): _TreeEstimatorRecord,
    ("sklearn.tree._tree", "Tree"): _TreeRecord,
    ("numpy", "ndarray"): _NdarrayMarker,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle's unpickler resolving only `_GLOBALS` (inert stand-ins) and joblib's array records.

    joblib writes each array's raw bytes right after the frame that ends with its record, and this unpickler reads
    its input a frame at a time from a stream without `peek`, so the record's `__setstate__` finds them next.
    """

    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream)
        self._array_record = type("_StreamArrayRecord", (_ArrayRecord,), {"_stream": stream})

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("joblib.numpy_pickle", "NumpyArrayWrapper"):
            return self._array_record
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise ForestArtifactError(
                f"the file refers to {module}.{name}, which a forest artifact never holds") from None

    def persistent_load(self, pid: object) -> object:
        raise ForestArtifactError("the file holds a persistent reference, which a forest artifact never holds")


def _array(obj: object, what: str) -> np.ndarray:
    if isinstance(obj, _ArrayRecord) and isinstance(getattr(obj, "array", None), np.ndarray):
        return obj.array
    raise ForestArtifactError(f"{what} is {obj!r}, not an array")


@dataclass(frozen=True)
class FlatForest:
    """A fitted forest as plain arrays over all its nodes, tree after tree: what the runtime is built from.

    Tree t's nodes are offset[t] .. offset[t+1]-1, its root first; `left` and `right` are indices within the tree,
    -1 at a leaf; `depth` is each node's depth and `position` its index in the tree's complete breadth-first layout
    (meaningful up to depth 62)."""

    n_features: int
    classes: np.ndarray  # int64, the forest's classes_ (its output columns)
    offset: np.ndarray  # int64 (n_trees + 1,)
    left: np.ndarray  # int64
    right: np.ndarray  # int64
    feature: np.ndarray  # int64 (0 at leaves)
    threshold: np.ndarray  # float64, scikit-learn's
    missing_left: np.ndarray  # uint8
    value: np.ndarray  # float64 (n_nodes, n_classes): what a leaf adds to a row's sum
    depth: np.ndarray  # int64
    position: np.ndarray  # int64

    @property
    def n_trees(self) -> int:
        return len(self.offset) - 1

    @property
    def tree_depth(self) -> np.ndarray:
        return np.maximum.reduceat(self.depth, self.offset[:-1])


_NODE_FIELDS = ("left_child", "right_child", "feature", "threshold", "missing_go_to_left")


def _tree_arrays(est: object, n_classes: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    where = f"estimators_[{index}]"
    if not isinstance(est, _TreeEstimatorRecord):
        raise ForestArtifactError(f"{where} is {est!r}, not a DecisionTreeClassifier")
    tree = getattr(est, "tree_", None)
    if not isinstance(tree, _TreeRecord):
        raise ForestArtifactError(f"{where}.tree_ is {tree!r}, not a scikit-learn Tree")
    nodes = _array(getattr(tree, "nodes", None), f"{where}.tree_.nodes")
    values = _array(getattr(tree, "values", None), f"{where}.tree_.values")
    if nodes.dtype.names is None or nodes.ndim != 1 or len(nodes) == 0 \
            or any(f not in nodes.dtype.names for f in _NODE_FIELDS):
        raise ForestArtifactError(f"{where}.tree_.nodes is not a non-empty array of nodes with {_NODE_FIELDS}")
    if values.ndim != 3 or values.shape[0] != len(nodes) or values.shape[1] != 1 or values.shape[2] < n_classes \
            or values.dtype.kind != "f":
        raise ForestArtifactError(f"{where}.tree_.values has shape {values.shape}, expected "
                                  f"({len(nodes)}, 1, >= {n_classes}) floats")
    return nodes, values


def read_forest(data: bytes) -> FlatForest:
    """The trees of a joblib-saved RandomForestClassifier (its bytes already verified), read without unpickling it.

    ForestArtifactError if the bytes are not such a forest (any other object, multi-output, a malformed tree).
    """
    if data[:1] == b"x":  # joblib's zlib compression
        d = zlib.decompressobj()
        try:
            raw = d.decompress(data, MAX_ARTIFACT_BYTES)
        except zlib.error as exc:
            raise ForestArtifactError(f"the file is not a zlib-compressed joblib file: {exc}") from None
        if d.unconsumed_tail:
            raise ForestArtifactError(f"the file decompresses to more than {MAX_ARTIFACT_BYTES} bytes")
    elif data[:1] == b"\x80":
        raw = data
    else:
        raise ForestArtifactError("the file is neither an uncompressed nor a zlib-compressed joblib file")
    try:
        forest = _RestrictedUnpickler(io.BytesIO(raw)).load()
    except ForestArtifactError:
        raise
    except Exception as exc:  # a malformed stream: pickle raises many types
        raise ForestArtifactError(f"the file cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(forest, _ForestRecord):
        raise ForestArtifactError(f"the file holds {forest!r}, not a RandomForestClassifier")
    n_outputs = getattr(forest, "n_outputs_", None)
    if n_outputs != 1:
        raise ForestArtifactError(f"n_outputs_ is {n_outputs!r}; only single-output forests are served")
    n_features = getattr(forest, "n_features_in_", None)
    if not isinstance(n_features, int | np.integer) or not 0 < int(n_features) < 2**31:
        raise ForestArtifactError(f"n_features_in_ is {n_features!r}, not a feature count")
    n_features = int(n_features)
    classes = _array(getattr(forest, "classes_", None), "classes_")
    if classes.ndim != 1 or not 1 <= len(classes) <= MAX_CLASSES or classes.dtype.kind not in "iuf":
        raise ForestArtifactError(f"classes_ is {classes!r}, not 1 to {MAX_CLASSES} numeric classes")
    k = len(classes)
    estimators = getattr(forest, "estimators_", None)
    if not isinstance(estimators, list) or not estimators:
        raise ForestArtifactError("estimators_ is not a non-empty list of trees")
    parts = [_tree_arrays(est, k, i) for i, est in enumerate(estimators)]
    nodes = np.concatenate([n[list(_NODE_FIELDS)] for n, _ in parts])
    value = np.ascontiguousarray(np.concatenate([v[:, 0, :k] for _, v in parts]), dtype=np.float64)
    sizes = np.array([len(n) for n, _ in parts], dtype=np.int64)
    offset = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offset[-1])
    base = np.repeat(offset[:-1], sizes)
    local = np.arange(n, dtype=np.int64) - base
    left = nodes["left_child"].astype(np.int64)
    right = nodes["right_child"].astype(np.int64)
    feature = nodes["feature"].astype(np.int64)
    leaf = left < 0
    inner = ~leaf
    size = np.repeat(sizes, sizes)
    if np.any(leaf != (right < 0)):
        raise ForestArtifactError("a tree node has exactly one child")
    # Children come after their parent (scikit-learn builds depth first), which also makes every walk end.
    if np.any(inner & ((left <= local) | (right <= local) | (left >= size) | (right >= size))):
        raise ForestArtifactError("a tree node's child index is out of range or not after its parent")
    if np.any(inner & ((feature < 0) | (feature >= n_features))):
        raise ForestArtifactError(f"a split feature is outside 0..{n_features - 1}")
    threshold = nodes["threshold"].astype(np.float64)
    if np.any(inner & np.isnan(threshold)):
        raise ForestArtifactError("a split threshold is NaN")
    if not np.all(np.isfinite(value[leaf])):
        raise ForestArtifactError("a leaf value is not finite")
    # Every node but the roots is the child of exactly one node: the trees are trees.
    children = np.concatenate([left[inner] + base[inner], right[inner] + base[inner]])
    parents = np.bincount(children, minlength=n)
    roots = offset[:-1]
    parents[roots] += 1
    if np.any(parents != 1):
        raise ForestArtifactError("a tree node is unreachable or the child of two nodes")
    depth = np.zeros(n, dtype=np.int64)
    position = np.zeros(n, dtype=np.int64)
    frontier = roots
    while len(frontier):
        frontier = frontier[inner[frontier]]
        lc, rc = left[frontier] + base[frontier], right[frontier] + base[frontier]
        depth[lc] = depth[rc] = depth[frontier] + 1
        with np.errstate(over="ignore"):
            position[lc] = 2 * position[frontier] + 1
            position[rc] = 2 * position[frontier] + 2
        frontier = np.concatenate([lc, rc])
    return FlatForest(
        n_features=n_features, classes=classes.astype(np.int64), offset=offset,
        left=np.where(leaf, -1, left), right=np.where(leaf, -1, right), feature=np.where(leaf, 0, feature),
        threshold=threshold, missing_left=nodes["missing_go_to_left"].astype(np.uint8), value=value, depth=depth,
        position=position,
    )


# -- the native library -------------------------------------------------------------------------------------------
_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lib_sha256: str | None = None


def _compiler() -> str | None:
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _compile(cc: str, out: str, flags: tuple[str, ...]) -> None:
    """Compile KERNEL_SOURCE into the shared library `out` (its directory must be private)."""
    src = os.path.join(os.path.dirname(out), "forest_kernel.c")
    with open(src, "w", encoding="ascii") as fh:
        fh.write(KERNEL_SOURCE)
    proc = subprocess.run([cc, *flags, "-o", out, src, "-lm"], capture_output=True, text=True, timeout=120,
                          check=False)
    if proc.returncode != 0:
        raise NativeUnavailable(f"{cc} failed to build the forest kernel: {' '.join(proc.stderr.split())[:300]}")


def _sha256_file(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _bind(handle: ctypes.CDLL) -> ctypes.CDLL:
    handle.forest_predict.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    handle.forest_predict.restype = None
    return handle


def _build_and_load() -> tuple[ctypes.CDLL, str]:
    cc = _compiler()
    if cc is None:
        return _load_prebuilt()
    workdir = tempfile.mkdtemp(prefix="mlsignal-forest-")  # mode 0700, owned by this process's user
    try:
        lib = os.path.join(workdir, "forest_kernel.so")
        _compile(cc, lib, CFLAGS)
        built = _sha256_file(lib)
        st = os.stat(workdir)
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise NativeUnavailable(f"the build directory {workdir} is not private to this user")
        loading = _sha256_file(lib)
        if loading != built:
            raise NativeUnavailable(f"the built forest kernel changed before loading (sha256 {loading}, built {built})")
        handle = ctypes.CDLL(lib)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _bind(handle), built


# -- a kernel built ahead of time (an image without a compiler) ---------------------------------------------------
#: Where a kernel built ahead of time is looked for when there is no compiler: this package's directory.
PREBUILT_DIR = os.path.dirname(os.path.abspath(__file__))
PREBUILT_LIBRARY = "_forest_kernel.so"
PREBUILT_RECORD = "_forest_kernel.json"  # {"library_sha256", "source_sha256"}
#: The ahead-of-time build runs elsewhere than where it is loaded: no -march=native.
PREBUILT_CFLAGS = tuple(f for f in CFLAGS if not f.startswith("-march"))


def build_prebuilt(directory: str) -> str:
    """Build the kernel ahead of time into `directory` with the record of its sha256 and of the source it was
    built from (for an image without a compiler: install both, read-only, into PREBUILT_DIR); returns the sha256."""
    cc = _compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler (cc, gcc or clang) on PATH to build the forest kernel")
    os.makedirs(directory, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="mlsignal-forest-")
    try:
        lib = os.path.join(workdir, PREBUILT_LIBRARY)
        _compile(cc, lib, PREBUILT_CFLAGS)
        sha = _sha256_file(lib)
        shutil.copyfile(lib, os.path.join(directory, PREBUILT_LIBRARY))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    record = {"library_sha256": sha, "source_sha256": hashlib.sha256(KERNEL_SOURCE.encode()).hexdigest()}
    with open(os.path.join(directory, PREBUILT_RECORD), "w", encoding="ascii") as fh:
        json.dump(record, fh)
    return sha


def _load_prebuilt() -> tuple[ctypes.CDLL, str]:
    """The kernel built ahead of time, loaded only if it is this source's build, its sha256 is the recorded one, and
    it, its record and their directory belong to root and are writable by root only."""
    lib, rec = os.path.join(PREBUILT_DIR, PREBUILT_LIBRARY), os.path.join(PREBUILT_DIR, PREBUILT_RECORD)
    if not (os.path.exists(lib) and os.path.exists(rec)):
        raise NativeUnavailable("no C compiler (cc, gcc or clang) on PATH to build the forest kernel, and no kernel "
                                f"built ahead of time in {PREBUILT_DIR}")
    for path in (PREBUILT_DIR, lib, rec):
        st = os.stat(path)
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o022:
            raise NativeUnavailable(f"the kernel built ahead of time is not loaded: {path} is not owned by root and "
                                    "writable by root only, so its recorded sha256 would prove nothing")
    try:
        with open(rec, encoding="ascii") as fh:
            record = json.load(fh)
        want, source = str(record["library_sha256"]), str(record["source_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NativeUnavailable(f"the record {rec} of the kernel built ahead of time cannot be read: {exc}") from None
    if source != hashlib.sha256(KERNEL_SOURCE.encode()).hexdigest():
        raise NativeUnavailable(f"the kernel built ahead of time in {PREBUILT_DIR} is of another source version")
    actual = _sha256_file(lib)
    if actual != want:
        raise NativeUnavailable(f"the kernel built ahead of time {lib} has sha256 {actual}, its record says {want}")
    return _bind(ctypes.CDLL(lib)), actual


def native_library() -> ctypes.CDLL:
    """The kernel library, built and loaded on first use (once per process); NativeUnavailable if it cannot be."""
    global _lib, _lib_error, _lib_sha256
    with _lib_lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise NativeUnavailable(_lib_error)
        try:
            _lib, _lib_sha256 = _build_and_load()
        except NativeUnavailable as exc:
            _lib_error = str(exc)
            raise
        except (OSError, subprocess.SubprocessError) as exc:
            _lib_error = f"the forest kernel could not be built or loaded: {exc}"
            raise NativeUnavailable(_lib_error) from None
        log.info("forest kernel loaded (sha256 %s)", _lib_sha256)
        return _lib


def library_sha256() -> str | None:
    """The sha256 of the kernel library this process built and loaded (None before the first build)."""
    return _lib_sha256


class _Model(ctypes.Structure):
    """forest_t of the kernel: sizes and the addresses of the arrays."""

    _fields_: ClassVar[list[tuple[str, type]]] = [
        *[(name, ctypes.c_int64) for name in ("n_features", "n_trees", "n_classes", "depth", "leaf_stride")],
        *[(name, ctypes.c_void_p) for name in ("c_node", "c_leaf", "offset", "tree_depth", "left",
                                                "right", "feature", "threshold", "missing_left", "value")],
    ]


# -- the runtime --------------------------------------------------------------------------------------------------
def float32_floor(t: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 threshold: for float32 x, x <= t exactly when x <= float32_floor(t)."""
    with np.errstate(over="ignore"):
        t32 = t.astype(np.float32)
    above = t32.astype(np.float64) > t
    t32[above] = np.nextafter(t32[above], np.float32(-np.inf))
    return t32


class NativeForest:
    """A forest ready to serve: `predict_proba` gives scikit-learn's predict_proba (the forest's class order)."""

    def __init__(self, forest: FlatForest, complete_max_depth: int = COMPLETE_MAX_DEPTH) -> None:
        self._lib = native_library()
        self.n_features = forest.n_features
        self.classes = forest.classes
        self.n_trees = t_count = forest.n_trees
        self.n_classes = k = len(forest.classes)
        f = forest
        leaf = f.left < 0
        local = np.arange(len(f.left), dtype=np.int64) - np.repeat(f.offset[:-1], np.diff(f.offset))
        tree_depth = f.tree_depth
        threshold32 = float32_floor(f.threshold)
        arrays = {
            "offset": f.offset,
            "tree_depth": tree_depth.astype(np.int64),
            # a leaf is its own child in the node walk, so a row that reached it stays there
            "left": np.where(leaf, local, f.left).astype(np.int32),
            "right": np.where(leaf, local, f.right).astype(np.int32),
            "feature": f.feature.astype(np.int32),
            "threshold": threshold32,
            "missing_left": f.missing_left,
            "value": f.value,
        }
        d = int(tree_depth.max())
        self.depth = d if d <= complete_max_depth else -1
        self.leaf_stride = 4 if k <= 4 else 8
        if self.depth >= 0:
            n_inner, n_leaves = (1 << d) - 1, 1 << d
            tree = np.repeat(np.arange(t_count), np.diff(f.offset))
            # node_t of the kernel: (float32 threshold, int32 byte offset of the feature in a row); padding nodes
            # below a leaf compare feature 0 with +inf (both sides lead to the same leaf value)
            node = np.zeros((t_count, n_inner), dtype=[("threshold", "<f4"), ("offset", "<i4")])
            node["threshold"] = np.inf
            inner = ~leaf
            node["offset"][tree[inner], f.position[inner]] = 4 * f.feature[inner]
            node["threshold"][tree[inner], f.position[inner]] = threshold32[inner]
            # A leaf at depth a, position p fills the 2**(d-a) leaf slots below it, from ((p+1) << (d-a)) - 1.
            span = np.left_shift(1, d - f.depth[leaf])
            first = np.left_shift(f.position[leaf] + 1, d - f.depth[leaf]) - 1 - n_inner
            starts = np.repeat(first - np.concatenate([[0], np.cumsum(span)[:-1]]), span)
            slots = starts + np.arange(int(span.sum()))
            # each leaf's class values padded with zeros to a whole number of 4-double vectors
            leaf_values = np.zeros((t_count, n_leaves, self.leaf_stride), dtype=np.float64)
            leaf_values[np.repeat(tree[leaf], span), slots, :k] = np.repeat(f.value[leaf], span, axis=0)
            arrays.update(c_node=node, c_leaf=leaf_values)
        # Kept here for as long as this object lives: the kernel reads them through the addresses in _model.
        self._arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
        self.nbytes = sum(a.nbytes for a in self._arrays.values())
        self._model = _Model(self.n_features, self.n_trees, k, self.depth, self.leaf_stride,
                             *[self._arrays[name].ctypes.data if name in self._arrays else None
                               for name, _ in _Model._fields_[5:]])
        self._model_ref = ctypes.addressof(self._model)
        self._predict = self._lib.forest_predict

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, n_classes) float64 for float features (cast to float32 like scikit-learn)."""
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        if X32.ndim != 2 or X32.shape[1] != self.n_features:
            raise ValueError(f"X: expected shape (n, {self.n_features}), got {X32.shape}")
        out = np.empty((len(X32), self.n_classes), dtype=np.float64)
        if len(X32):
            self._predict(self._model_ref, X32.ctypes.data, len(X32), out.ctypes.data)
        return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shared.forest_runtime",
                                     description="Build the forest kernel ahead of time, with its sha256 record.")
    parser.add_argument("--build-prebuilt", metavar="DIR", required=True)
    print(build_prebuilt(parser.parse_args().build_prebuilt))
