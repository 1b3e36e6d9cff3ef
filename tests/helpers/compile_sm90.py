"""Compiles every Triton kernel of pema_triton for Hopper (sm_90) with Triton's bundled ptxas, no GPU needed, and
prints one JSON line per kernel: registers, local memory (spills), the atomic / fence instructions in its SASS, what
its PTX uses (cp.async, wgmma, vector loads) and any 32-bit index products in its TTGIR. It compiles what a launch
compiles: with the 16-byte divisibility hints of aligned pointers and of D and V. Without them (Triton 3.9) the
first fused loss's kernels took 255 registers, no cp.async and scalar atomics, and no kernel had a vector load:
kernels nobody launches (with them: 131 / 160 registers, cp.async, 16-byte atomics, vector loads).

    python tests/helpers/compile_sm90.py      # TRITON_INTERPRET must be unset: the interpreter compiles nothing

Signatures and tile sizes are the launchers' GPU choices (kernels/*.py), in the dtypes training uses.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# The modules, not the launchers pema_triton.ops.kernels re-exports under the same names (`lookup`).
cross_entropy_rows, lookup, lookup_backward, scan = (
    importlib.import_module(f"pema_triton.ops.kernels.{m}")
    for m in ("cross_entropy_rows", "lookup", "lookup_backward", "scan")
)

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _kernels():
    """(name, jit function, {arg: type}, {constexpr: value}) for each kernel and training dtype."""
    for dt in ("bf16", "fp32"):
        p = f"*{dt}"
        yield (f"lookup-{dt}", lookup._lookup_kernel, {"ids_ptr": "*i64", "remap_ptr": "*i32", "weight_ptr": p,
               "out_ptr": p, "num_bad_ptr": "*i32", "N": "i32", "V": "i32", "D": "i32"},
               {"BLOCK_N": 8, "BLOCK_D": 512})
        yield (f"scatter-atomic-{dt}", lookup_backward._scatter_atomic_kernel, {"grad_out_ptr": p, "ids_ptr": "*i64",
               "remap_ptr": "*i32", "acc_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32", "padding_row": "i32"},
               {"BLOCK_N": 8, "BLOCK_D": 512})
        default = lookup_backward.sorted_blocks(2**20, 4096)
        sorted_types = {"grad_out_ptr": p, "sorted_rows_ptr": "*i32", "order_ptr": "*i64", "head_row_ptr": "*i32",
                        "tail_row_ptr": "*i32", "partial_ptr": "*fp32", "grad_weight_ptr": p, "N": "i32", "D": "i32"}
        # The default tile in each dtype; the candidates the benchmark times (SORTED_TILES) in the default's, bf16.
        for tile in [None] + (sorted(set(lookup_backward.SORTED_TILES) - {"32x128"}) if dt == "bf16" else []):
            blocks = lookup_backward.sorted_blocks(2**20, 4096, tile)
            yield (f"scatter-sorted-{tile + '-' if tile else ''}{dt}", lookup_backward._scatter_sorted_kernel,
                   sorted_types, {"TILES": blocks["TILES"], "BLOCK_T": blocks["BLOCK_T"], "BLOCK_D": blocks["BLOCK_D"],
                                  "ACC_DTYPE": tl.float32, "MMA": blocks["MMA"]})
        yield (f"scatter-sorted-fixup-{dt}", lookup_backward._scatter_sorted_fixup_kernel, {"head_row_ptr": "*i32",
               "tail_row_ptr": "*i32", "partial_ptr": "*fp32", "grad_weight_ptr": p, "C": "i32", "D": "i32"},
               {"BLOCK_K": default["BLOCK_K"], "BLOCK_D": default["BLOCK_D"]})
        rows_types = {"logits_ptr": p, "targets_ptr": "*i64", "scale_ptr": "*fp32", "loss_ptr": "*fp32",
                      "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "argmax_ptr": "*i64", "inv_temperature_ptr": "*fp32"}
        yield (f"cross-entropy-rows-{dt}", cross_entropy_rows._cross_entropy_rows_kernel, rows_types,
               {"IGNORE": -100, "V": 151_936, "BLOCK_V": cross_entropy_rows.block_v(151_936),
                "ACC_DTYPE": tl.float32, "WRITE_GRAD": True, "STATS": False, "ENTROPY": False, "TOP1": False,
                "TEMPERATURE": False})
        # TRL's log-probs: the entropy's sum and the first maximum beside the max and sum, at a temperature.
        yield (f"log-prob-rows-{dt}", cross_entropy_rows._cross_entropy_rows_kernel, rows_types,
               {"IGNORE": -100, "V": 151_936, "BLOCK_V": cross_entropy_rows.block_v(151_936, stats=True),
                "ACC_DTYPE": tl.float32, "WRITE_GRAD": True, "STATS": True, "ENTROPY": True, "TOP1": True,
                "TEMPERATURE": True})
    for ids in ("i32", "i64"):
        yield (f"scan-{ids}", scan._scan_kernel, {"ids_ptr": f"*{ids}", "byte_map_ptr": "*u8", "counts_ptr": "*i64",
               "num_bad_ptr": "*i32", "N": "i32", "V": "i32", "ignore_index": "i32"},
               {"HAS_COUNTS": True, "HAS_IGNORE": True, "BLOCK": 4096})
    yield ("scan-packed", scan._scan_packed_kernel, {"ids_ptr": "*i64", "words_ptr": "*i32", "num_bad_ptr": "*i32",
           "N": "i32", "V": "i32"}, {"BLOCK": 4096})


# Integer arguments a launch sees as multiples of 16 in real models (D = 576 ... 8192; V = 49,152, 128,256, 151,936;
# the scan's V too): Triton's launcher then specialises them, as it does every 16-byte aligned pointer.
_DIVISIBLE_INTS = ("D", "V")


def _launch_attrs(fn, types: dict) -> dict:
    """The `tt.divisibility = 16` hints a launch on real tensors compiles with (pointers from torch allocations are
    16-byte aligned): without them the compiler cannot vectorise loads or pipeline them with cp.async."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if types.get(name, "").startswith("*") or (name in _DIVISIBLE_INTS and name in types)}


def _compile(fn, types: dict, constexprs: dict) -> dict:
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=_launch_attrs(fn, types))
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "local_bytes": int(re.search(r"LOCAL:(\d+)", usage).group(1)),
            "memory_ops": sorted(set(re.findall(r"\b((?:REDG|ATOMG|RED|ATOM|MEMBAR)\.[\w.]+|MEMBAR)", sass))),
            "cp_async": "cp.async" in ptx, "wgmma": "wgmma.mma_async" in ptx, "mma": "mma.sync" in ptx,
            "vector_loads": bool(re.search(r"ld\.global(?:\.\w+)*\.v[248]", ptx)),
            # Products on index tensors in 32 bits: a row * D offset that wraps once the matrix passes 2^31 elements.
            "i32_index_products": re.findall(r"arith\.muli [^\n]*: tensor<[^>]*xi32", ttgir)}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    for name, fn, types, constexprs in _kernels():
        try:
            print(json.dumps({"kernel": name, **_compile(fn, types, constexprs)}), flush=True)
        except Exception as error:  # noqa: BLE001 - each kernel's failure is reported, the rest still compile
            print(json.dumps({"kernel": name, "error": f"{type(error).__name__}: {str(error)[:2000]}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
