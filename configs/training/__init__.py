"""The older system's configs/training package, kept so its README's examples run verbatim."""
