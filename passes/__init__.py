"""Graph passes, one a file. Each is `(gm, ctx) -> PassResult`; `samq_fx.pipeline` orders them."""
