mod gpu_providers;
mod support;
