"""Which ops of a traced function would run on the CPU on a GPU machine.

TensorFlow's standard Linux wheel registers its CUDA kernels even on a machine without
a GPU, so the kernel registry can be read anywhere: an op without a GPU (or any-device)
kernel for its dtypes would run on the CPU on a GPU machine, with copies both ways
every step. The walk follows every function the traced function calls (while bodies,
branches, the per-replica step); bodies compiled by XLA are skipped, since XLA compiles
them for the GPU as a whole or refuses at compile time, never falling back op by op.
Used by tests/test_gpu_kernels.py and benchmarks/gpu_check.py.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.framework import kernels

# Ops that run on the host by design, and why.
HOST_OPS = {
    # None today: every op of every path below has a GPU kernel for its dtypes.
}
_kernels: dict[str, list] = {}


def _gpu_kernels(op):
    if op not in _kernels:
        _kernels[op] = [k for k in kernels.get_registered_kernels_for_op(op).kernel
                        if k.device_type in ("GPU", "DEFAULT")]  # DEFAULT: any device
    return _kernels[op]


def _has_gpu_kernel(node) -> bool:
    for kernel in _gpu_kernels(node.op):
        fits = True
        for constraint in kernel.constraint:
            allowed = constraint.allowed_values.list.type
            if not allowed or constraint.name not in node.attr:
                continue
            attr = node.attr[constraint.name]
            values = list(attr.list.type) if attr.HasField("list") else [attr.type]
            if any(v not in allowed for v in values):
                fits = False
                break
        if fits:
            return True
    return False


def ops_without_gpu_kernel(concrete_function) -> list[tuple[str, str, dict]]:
    """[(function, op, {attr: dtype})] for every node, in every function it calls, that
    has no GPU kernel for its dtypes."""
    graph_def = concrete_function.graph.as_graph_def()
    functions = {f.signature.name: f for f in graph_def.library.function}
    seen, missing = set(), []

    def visit_function(name):
        if name in seen:
            return
        seen.add(name)
        function = functions[name]
        if "_XlaMustCompile" in function.attr and function.attr["_XlaMustCompile"].b:
            return
        visit_nodes(function.node_def, name)

    def visit_nodes(nodes, where):
        for node in nodes:
            if node.op in functions:
                visit_function(node.op)
                continue
            for attr in node.attr.values():
                if attr.HasField("func") and attr.func.name in functions:
                    visit_function(attr.func.name)
                for f in attr.list.func:
                    if f.name in functions:
                        visit_function(f.name)
            if not _has_gpu_kernel(node) and node.op not in HOST_OPS:
                missing.append((where, node.op, {k: tf.dtypes.as_dtype(v.type).name
                                                 for k, v in node.attr.items() if v.type}))

    visit_nodes(graph_def.node, "loop")
    return missing
