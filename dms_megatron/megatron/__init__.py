"""Megatron-core wiring of DMS: CPU shims, process groups, DMS attention modules, layer specs, model builder."""
