"""`hivlp serve`: the search library behind HTTP (a JSON API, thumbnails and a web page)."""
