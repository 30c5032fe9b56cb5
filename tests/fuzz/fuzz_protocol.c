/* libFuzzer target for the wire protocol decoder (built with -DTERN_FUZZ=ON and clang; not part
 * of ctest). Whatever decode accepts must encode again and decode to the same bytes, a decoded
 * chunk must be accepted by a transfer built from its own description, and a decoded CHUNK_ACK
 * by a send window for a payload of exactly `credit` chunks. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tern/protocol.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    tern_msg m;
    if (tern_msg_decode(data, size, NULL, &m, NULL, NULL) != TERN_OK)
        return 0;
    void *bytes = NULL;
    size_t len = 0;
    if (tern_msg_encode(&m, NULL, NULL, &bytes, &len, NULL) != TERN_OK)
        abort(); /* decode accepted something encode refuses */
    tern_msg again;
    if (tern_msg_decode(bytes, len, NULL, &again, NULL, NULL) != TERN_OK)
        abort();
    tern_proto_free(NULL, bytes);
    if (m.type == TERN_MSG_MODEL_CHUNK && m.chunk.info.total_size <= (1u << 20)) {
        tern_transfer *t = NULL;
        if (tern_transfer_create(&m.chunk.info, NULL, NULL, &t, NULL) != TERN_OK)
            abort();
        tern_status st = tern_transfer_add(t, &m.chunk, NULL);
        if (st != TERN_OK && st != TERN_ERR_FORMAT) /* FORMAT: a one-chunk hash mismatch */
            abort();
        tern_transfer_destroy(&t);
    }
    if (m.type == TERN_MSG_CHUNK_ACK) {
        tern_payload_info info = {.transfer_id = m.chunk_ack.transfer_id,
                                  .chunk_count = m.chunk_ack.credit};
        tern_send_window w = {0};
        tern_send_window_start(&w, &info);
        if (tern_send_window_ack(&w, &m.chunk_ack) != TERN_OK)
            abort();
        if (w.credit != m.chunk_ack.credit || w.acked != m.chunk_ack.received ||
            w.done != (m.chunk_ack.received == m.chunk_ack.credit))
            abort();
        uint32_t index;
        bool ready = tern_send_window_ready(&w, &index);
        if (ready != (!w.done && w.credit > 0) || (ready && index != 0))
            abort();
    }
    return 0;
}
