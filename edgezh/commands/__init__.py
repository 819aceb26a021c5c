"""One module per `edgezh` verb."""
