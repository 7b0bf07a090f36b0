"""Test double of tensorflow-neuron (inf1: neuron-cc); see tests/fake_neuron/_fake_neuron.py."""

from _fake_neuron import INF1, make_trace

__version__ = "2.10.1.0+bertpool.fake"
trace = make_trace(INF1)
