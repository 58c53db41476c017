"""The wire contract: subjects, names, messages, headers and errors. No I/O lives here."""
