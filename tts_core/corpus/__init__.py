"""The embedded demo corpus: real labelled speech synthesised offline with espeak-ng.

`demo` (generate_demo_corpus) · `espeak` (ctypes driver) · `instructions` (attributes -> text) ·
`sentences` (public-domain prose). Nothing is imported here, so `python -m tts_core.corpus.demo` runs cleanly.
"""
