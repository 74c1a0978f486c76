"""The sample world: the embedded default data set that `make demo` and the tests run on.

Real music (the music21 corpus, or a MIDI folder) rendered to audio by invented artists, vocal
lines in several languages, simulated listeners with genre affinities and a taste over audible
factors, and their logs (sessions, similar-songs impressions with clicks and favors), written in
the data contracts of htcl.schema (the README's "Data contract"). See `generate_world` and `htcl sample-data --help`.
"""

from htcl.sample_world.world import generate_world

__all__ = ["generate_world"]
