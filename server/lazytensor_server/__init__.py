"""lazytensor_server: the GPU server that runs traced requests against loaded models."""
