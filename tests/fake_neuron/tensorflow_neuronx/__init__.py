"""Test double of tensorflow-neuronx (inf2/trn1: neuronx-cc); see tests/fake_neuron/_fake_neuron.py."""

from _fake_neuron import INF2, make_trace

__version__ = "2.10.1.1.0.0+bertpool.fake"
trace = make_trace(INF2)
