"""The frozen environment: data, tokenisation, the time budget, evaluation and the runner.

Nothing here changes during a campaign. Its constants and the prepared data are hashed into a
fingerprint that is recorded with every result, so results are comparable only when it matches.
"""
