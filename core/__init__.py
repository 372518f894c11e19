"""The bottom layer every package uses: errors, config parsing, the corpus and its protocol, model families."""
