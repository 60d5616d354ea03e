"""Developer tools: the local stack, the demo, the benchmarks and the scripted therapist.

They drive the product (``controller``) and the simulated pen from outside; the
product never imports them (``tests/test_layering.py`` checks it), so a clinic's
installation carries no demo clinic and no benchmark rig in its import graph.
"""
