"""Ahead-of-time compilation for named TPU topologies on a CPU-only host (`python -m lumina_jax.aot`).

`topology`: chip facts, topology parsing, compile-only devices and meshes; `programs`: the train step and
the generation loop lowered from abstract sharded inputs; `report`: compile, memory per device, FLOPs, fit.
See docs/aot.md.
"""
