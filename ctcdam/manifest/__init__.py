"""The preprocessing manifest: its columns, writer, reader (typed, validated, paths resolved), crops and run record."""
