"""qwen-gateway: an OpenAI-compatible gateway that keeps per-task SLAs for one Qwen model on vLLM.

Module layers, imports pointing down only:

    app          routes, lifespan, the request's outer shell
    pipeline     two-step tasks (assist)
    proxy        one task step: queue, upstream call, relay
    runtime      the long-lived parts, built in the lifespan
    dispatch     asyncio glue around the scheduler     upstreams  health of the vLLM servers
    scheduler    pure queueing/dispatch logic          upstream   all outbound HTTP
    exchange     one request's record                  metrics    Prometheus names
    protocol     OpenAI wire format                    sse        event framing
    config       the task table                        settings   process settings
    classes      priority classes and vLLM's scale     errors     the error envelope
"""
