"""Running the notebooks headless (``notebooks``) and writing their results all at once (``outputs``)."""
