"""Building blocks shared by the components: chunked attention, subsampling, Llama blocks, quantizers."""
