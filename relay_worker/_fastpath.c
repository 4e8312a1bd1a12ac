/* The relay's per-packet loops in C: the compiled half of relay_worker/fastpath.py.
 *
 * A Router belongs to a worker: its table of local clients (Relay.clients) and, once the worker
 * mesh is attached, the key directory (owner of each key), this worker's own owner id and the mesh
 * links (owner -> link). It serves one read at a time, as the worker's loop does.
 *
 * route(data, pos) walks the complete frames of `data` from `pos` for as long as each is a SendPacket
 * of a valid size whose destination is a local client, or a key another worker of the cluster owns
 * and has a link to; it files the packet under that client or link and returns where it stopped: at
 * the first frame it leaves to Python (any other type, an invalid size, any other destination) or at
 * the first incomplete frame. take(key) then builds, per client, one bytes object of RecvPacket
 * frames (header, `key` as the source, packet) and, per link, one bytes object of mesh packet records
 * (dst, src, length, packet; mesh/wire.py), in arrival order, and returns them with the counts.
 *
 * mesh_frames(message, active) is the receiving end: the RecvPacket frames, per local client, of a
 * mesh PACKETS message.
 *
 * Everything a frame can mean besides "relay this" stays in Python (session.py, worker_mesh.py),
 * which is also the reference: with this module absent the same loops run there.
 *
 * Memory: a read's packets are recorded as (destination, source, offset, length) in an array that
 * grows with the read (at most one record per 37 bytes read); the read's buffers are held until
 * take(), clear() or deallocation.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <structmember.h>

#define HEADER_LEN 5
#define KEY_LEN 32
#define SEND_PACKET 0x04
#define RECV_PACKET 0x05
#define MESH_HEAD_LEN (2 * KEY_LEN + 4) /* mesh/wire.py: dst, src, u32 length */
#define MAX_BUFFERS 8

typedef struct {
    Py_ssize_t target; /* >= 0: index into the clients' batches; < 0: -1 - index into the links' */
    const char *src;   /* the source key; NULL: the reading client's, given to take() */
    const char *start; /* the packet; its destination key is the KEY_LEN bytes before it */
    Py_ssize_t length;
} Record;

/* the destinations of one read and the frames filed under each */
typedef struct {
    PyObject *objects; /* list: clients or links, in first-seen order */
    Py_ssize_t *sizes; /* bytes of output per destination */
    Py_ssize_t *counts;
    Py_ssize_t cap;
} Batches;

typedef struct {
    Record *records;
    Py_ssize_t n, cap;
} Records;

typedef struct {
    PyObject_HEAD
    PyObject *clients;   /* dict: key -> client */
    PyObject *owners;    /* dict: key -> owner (the mesh directory), or NULL before the mesh */
    PyObject *own;       /* this worker's owner */
    PyObject *links;     /* dict: owner -> mesh link */
    Py_ssize_t max_packet;
    Py_ssize_t min_burst; /* a frame charges min(its length, this) to the client's read limit */
    /* this read's state, emptied by take() */
    Records records;
    Batches to_clients, to_links;
    Py_buffer buffers[MAX_BUFFERS];
    int n_buffers;
    Py_ssize_t payload_bytes;
    Py_ssize_t charged;
} Router;

static Py_ssize_t be32(const unsigned char *p) {
    return ((Py_ssize_t)p[0] << 24) | ((Py_ssize_t)p[1] << 16) | ((Py_ssize_t)p[2] << 8) | (Py_ssize_t)p[3];
}

static void put_be32(char *p, Py_ssize_t v) {
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
}

static int batches_init(Batches *b) {
    b->objects = PyList_New(0);
    return b->objects == NULL ? -1 : 0;
}

static void batches_reset(Batches *b) {
    if (b->objects != NULL && PyList_GET_SIZE(b->objects) > 0) {
        PyList_SetSlice(b->objects, 0, PyList_GET_SIZE(b->objects), NULL);
    }
}

static void batches_free(Batches *b) {
    Py_CLEAR(b->objects);
    PyMem_Free(b->sizes);
    PyMem_Free(b->counts);
    b->sizes = b->counts = NULL;
    b->cap = 0;
}

/* `*array` resized to `cap` items of `item` bytes; -1 (MemoryError set, `*array` kept) on failure */
static int resize(void **array, Py_ssize_t cap, size_t item) {
    void *resized = PyMem_Realloc(*array, cap * item);
    if (resized == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *array = resized;
    return 0;
}

/* index of `object` among this read's destinations, appended when new; -1 on error */
static Py_ssize_t batches_index(Batches *b, PyObject *object, Py_ssize_t last) {
    Py_ssize_t n = PyList_GET_SIZE(b->objects);
    if (last >= 0 && last < n && PyList_GET_ITEM(b->objects, last) == object) {
        return last;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyList_GET_ITEM(b->objects, i) == object) {
            return i;
        }
    }
    if (n == b->cap) {
        Py_ssize_t cap = b->cap ? 2 * b->cap : 8;
        if (resize((void **)&b->sizes, cap, sizeof(Py_ssize_t)) < 0 ||
            resize((void **)&b->counts, cap, sizeof(Py_ssize_t)) < 0) {
            return -1;
        }
        b->cap = cap;
    }
    if (PyList_Append(b->objects, object) < 0) {
        return -1;
    }
    b->sizes[n] = 0;
    b->counts[n] = 0;
    return n;
}

static int records_add(Records *r, Py_ssize_t target, const char *src, const char *start, Py_ssize_t length) {
    if (r->n == r->cap) {
        Py_ssize_t cap = r->cap ? 2 * r->cap : 64;
        if (resize((void **)&r->records, cap, sizeof(Record)) < 0) {
            return -1;
        }
        r->cap = cap;
    }
    Record *record = &r->records[r->n++];
    record->target = target;
    record->src = src;
    record->start = start;
    record->length = length;
    return 0;
}

/* One bytes object per destination with room for its frames; `cursor` gets where each is filled
 * from. Returns a list of (destination, bytes, count), leaving out destinations with no frames. */
static PyObject *batches_allocate(Batches *b, char **cursor) {
    Py_ssize_t n = PyList_GET_SIZE(b->objects);
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        cursor[i] = NULL;
        if (b->counts[i] == 0) {
            continue; /* all of its frames were discarded */
        }
        PyObject *data = PyBytes_FromStringAndSize(NULL, b->sizes[i]);
        PyObject *item = data == NULL ? NULL : Py_BuildValue("(ONn)", PyList_GET_ITEM(b->objects, i), data, b->counts[i]);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
        cursor[i] = PyBytes_AS_STRING(data);
    }
    return out;
}

static char *write_recv_frame(char *out, const char *src, const char *packet, Py_ssize_t length) {
    out[0] = RECV_PACKET;
    put_be32(out + 1, KEY_LEN + length);
    memcpy(out + HEADER_LEN, src, KEY_LEN);
    memcpy(out + HEADER_LEN + KEY_LEN, packet, length);
    return out + HEADER_LEN + KEY_LEN + length;
}

static char *write_mesh_record(char *out, const char *dst, const char *src, const char *packet, Py_ssize_t length) {
    memcpy(out, dst, KEY_LEN);
    memcpy(out + KEY_LEN, src, KEY_LEN);
    put_be32(out + 2 * KEY_LEN, length);
    memcpy(out + MESH_HEAD_LEN, packet, length);
    return out + MESH_HEAD_LEN + length;
}

/* -- Router ---------------------------------------------------------------------------------------- */

static void release_read(Router *self) {
    for (int i = 0; i < self->n_buffers; i++) {
        PyBuffer_Release(&self->buffers[i]);
    }
    self->n_buffers = 0;
    self->records.n = 0;
    self->payload_bytes = 0;
    self->charged = 0;
    batches_reset(&self->to_clients);
    batches_reset(&self->to_links);
}

static int Router_init(Router *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"clients", "max_packet", "min_burst", NULL};
    PyObject *clients;
    Py_ssize_t max_packet, min_burst;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!nn", kwlist, &PyDict_Type, &clients, &max_packet,
                                     &min_burst)) {
        return -1;
    }
    Py_INCREF(clients);
    Py_XSETREF(self->clients, clients);
    self->max_packet = max_packet;
    self->min_burst = min_burst;
    if (self->to_clients.objects == NULL && batches_init(&self->to_clients) < 0) {
        return -1;
    }
    if (self->to_links.objects == NULL && batches_init(&self->to_links) < 0) {
        return -1;
    }
    return 0;
}

static PyObject *Router_attach_mesh(Router *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"owners", "own", "links", NULL};
    PyObject *owners, *own, *links;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO!", kwlist, &PyDict_Type, &owners, &own, &PyDict_Type,
                                     &links)) {
        return NULL;
    }
    if (self->records.n) {
        PyErr_SetString(PyExc_RuntimeError, "attach_mesh() in the middle of a read");
        return NULL;
    }
    Py_INCREF(owners);
    Py_XSETREF(self->owners, owners);
    Py_INCREF(own);
    Py_XSETREF(self->own, own);
    Py_INCREF(links);
    Py_XSETREF(self->links, links);
    Py_RETURN_NONE;
}

static int Router_traverse(Router *self, visitproc visit, void *arg) {
    Py_VISIT(self->clients);
    Py_VISIT(self->owners);
    Py_VISIT(self->own);
    Py_VISIT(self->links);
    Py_VISIT(self->to_clients.objects);
    Py_VISIT(self->to_links.objects);
    return 0;
}

static int Router_clear(Router *self) {
    release_read(self);
    Py_CLEAR(self->clients);
    Py_CLEAR(self->owners);
    Py_CLEAR(self->own);
    Py_CLEAR(self->links);
    Py_CLEAR(self->to_clients.objects);
    Py_CLEAR(self->to_links.objects);
    return 0;
}

static void Router_dealloc(Router *self) {
    PyObject_GC_UnTrack(self);
    Router_clear(self);
    batches_free(&self->to_clients);
    batches_free(&self->to_links);
    PyMem_Free(self->records.records);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* the mesh link for a key another worker owns; NULL (no error set) when Python must decide */
static PyObject *remote_link(Router *self, PyObject *dst) {
    if (self->owners == NULL) {
        return NULL;
    }
    PyObject *owner = PyDict_GetItemWithError(self->owners, dst); /* borrowed */
    if (owner == NULL) {
        return NULL;
    }
    if (owner == self->own) {
        return NULL;
    }
    int mine = PyObject_RichCompareBool(owner, self->own, Py_EQ);
    if (mine != 0) {
        return NULL; /* ours (or an error, left set) */
    }
    return PyDict_GetItemWithError(self->links, owner);
}

static PyObject *Router_route(Router *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "route(data, pos)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* a read's buffer is held once, however many runs of it are routed */
    int held = self->n_buffers > 0 && self->buffers[self->n_buffers - 1].obj == args[0];
    if (!held && self->n_buffers == MAX_BUFFERS) {
        return PyLong_FromSsize_t(pos); /* Python takes the rest of this read */
    }
    Py_buffer *view = &self->buffers[held ? self->n_buffers - 1 : self->n_buffers];
    if (!held && PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *data = view->buf;
    Py_ssize_t end = view->len, start = pos, last_client = -1, last_link = -1;
    if (pos < 0 || pos > end) {
        if (!held) {
            PyBuffer_Release(view);
        }
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        return NULL;
    }
    while (end - pos >= HEADER_LEN && data[pos] == SEND_PACKET) {
        Py_ssize_t length = be32(data + pos + 1);
        if (length < KEY_LEN || length - KEY_LEN > self->max_packet || end - pos - HEADER_LEN < length) {
            break;
        }
        const char *packet = (const char *)data + pos + HEADER_LEN + KEY_LEN;
        PyObject *dst = PyBytes_FromStringAndSize(packet - KEY_LEN, KEY_LEN);
        if (dst == NULL) {
            goto error;
        }
        Py_ssize_t target;
        PyObject *client = PyDict_GetItemWithError(self->clients, dst); /* borrowed */
        if (client != NULL) {
            target = last_client = batches_index(&self->to_clients, client, last_client);
            if (target >= 0) {
                self->to_clients.sizes[target] += HEADER_LEN + length;
                self->to_clients.counts[target] += 1;
            }
        } else {
            PyObject *link = PyErr_Occurred() ? NULL : remote_link(self, dst);
            if (link == NULL) {
                Py_DECREF(dst);
                if (PyErr_Occurred()) {
                    goto error;
                }
                break; /* not a destination the compiled loop decides */
            }
            last_link = batches_index(&self->to_links, link, last_link);
            target = last_link < 0 ? last_link : -1 - last_link;
            if (last_link >= 0) {
                self->to_links.sizes[last_link] += MESH_HEAD_LEN + length - KEY_LEN;
                self->to_links.counts[last_link] += 1;
            }
        }
        Py_DECREF(dst);
        if ((client != NULL ? target < 0 : last_link < 0) ||
            records_add(&self->records, target, NULL, packet, length - KEY_LEN) < 0) {
            goto error;
        }
        self->payload_bytes += length - KEY_LEN;
        self->charged += length < self->min_burst ? length : self->min_burst;
        pos += HEADER_LEN + length;
    }
    if (!held) {
        if (pos == start) {
            PyBuffer_Release(view); /* nothing of it recorded: no need to hold it */
        } else {
            self->n_buffers++;
        }
    }
    return PyLong_FromSsize_t(pos);
error:
    if (!held) {
        self->n_buffers++; /* records may point into it: kept until take(), clear() or dealloc */
    }
    return NULL;
}

static PyObject *Router_take(Router *self, PyObject *arg) {
    Py_buffer key;
    if (PyObject_GetBuffer(arg, &key, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (key.len != KEY_LEN) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "take(key): the source key must be 32 bytes");
        return NULL;
    }
    char source[KEY_LEN];
    memcpy(source, key.buf, KEY_LEN);
    PyBuffer_Release(&key);
    Py_ssize_t n_clients = PyList_GET_SIZE(self->to_clients.objects);
    Py_ssize_t n_links = PyList_GET_SIZE(self->to_links.objects);
    char **cursor = PyMem_Malloc((n_clients + n_links + 1) * sizeof(char *));
    if (cursor == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *clients = batches_allocate(&self->to_clients, cursor);
    PyObject *links = clients == NULL ? NULL : batches_allocate(&self->to_links, cursor + n_clients);
    if (links == NULL) {
        Py_XDECREF(clients);
        PyMem_Free(cursor);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < self->records.n; k++) {
        Record *r = &self->records.records[k];
        if (r->target >= 0) {
            cursor[r->target] = write_recv_frame(cursor[r->target], source, r->start, r->length);
        } else {
            char **out = &cursor[n_clients - 1 - r->target];
            *out = write_mesh_record(*out, r->start - KEY_LEN, source, r->start, r->length);
        }
    }
    PyMem_Free(cursor);
    Py_ssize_t packets = self->records.n, payload_bytes = self->payload_bytes, charged = self->charged;
    release_read(self);
    return Py_BuildValue("(NNnnn)", clients, links, packets, payload_bytes, charged);
}

/* Forget the packets recorded from `payload`'s position on: the reading connection stopped at that
 * frame (a protocol error, or it closed), and nothing it sent after it may be relayed. They stay
 * charged to its read limit, as every frame of a read is in the Python loop. */
static PyObject *Router_discard_from(Router *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const char *from = view.buf;
    PyBuffer_Release(&view);
    Py_ssize_t keep = self->records.n;
    while (keep > 0 && self->records.records[keep - 1].start >= from) {
        keep--;
    }
    for (Py_ssize_t k = keep; k < self->records.n; k++) {
        Record *r = &self->records.records[k];
        if (r->target >= 0) {
            self->to_clients.sizes[r->target] -= HEADER_LEN + KEY_LEN + r->length;
            self->to_clients.counts[r->target] -= 1;
        } else {
            self->to_links.sizes[-1 - r->target] -= MESH_HEAD_LEN + r->length;
            self->to_links.counts[-1 - r->target] -= 1;
        }
        self->payload_bytes -= r->length;
    }
    self->records.n = keep;
    Py_RETURN_NONE;
}

static PyObject *Router_clear_read(Router *self, PyObject *Py_UNUSED(ignored)) {
    release_read(self);
    Py_RETURN_NONE;
}

static PyMemberDef Router_members[] = {
    {"pending", T_PYSSIZET, offsetof(Router, records) + offsetof(Records, n), READONLY,
     "packets recorded since the last take()"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Router_methods[] = {
    {"route", (PyCFunction)(void (*)(void))Router_route, METH_FASTCALL,
     "route(data, pos) -> pos: file the run of routable SendPacket frames from pos"},
    {"take", (PyCFunction)Router_take, METH_O,
     "take(key) -> (to_clients, to_links, packets, payload_bytes, charged): this read's batches, "
     "each a list of (destination, bytes, count)"},
    {"discard_from", (PyCFunction)Router_discard_from, METH_O,
     "discard_from(payload): forget the packets recorded from this payload's position on"},
    {"clear", (PyCFunction)Router_clear_read, METH_NOARGS, "clear(): forget this read's packets"},
    {"attach_mesh", (PyCFunction)(void (*)(void))Router_attach_mesh, METH_VARARGS | METH_KEYWORDS,
     "attach_mesh(owners, own, links): also route to keys other workers own"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RouterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay_worker._fastpath.Router",
    .tp_basicsize = sizeof(Router),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Router(clients, max_packet, min_burst): a worker's SendPacket routing, in C",
    .tp_traverse = (traverseproc)Router_traverse,
    .tp_clear = (inquiry)Router_clear,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Router_init,
    .tp_dealloc = (destructor)Router_dealloc,
    .tp_methods = Router_methods,
    .tp_members = Router_members,
};

/* -- the receiving end of the worker mesh ------------------------------------------------------------ */

static PyObject *mesh_frames(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "mesh_frames(message, active)");
        return NULL;
    }
    PyObject *active = args[1];
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const char *data = view.buf;
    Py_ssize_t end = view.len, pos = 1, count = 0, dropped = 0, last = -1;
    const char *last_src = NULL, *last_dst = NULL;
    PyObject *error = NULL; /* the first malformation, worded as mesh/wire.py's iter_packets */
    Records records = {NULL, 0, 0};
    Batches to_clients = {NULL, NULL, NULL, 0};
    PyObject *pairs = PyList_New(0), *result = NULL;
    char **cursor = NULL;
    if (pairs == NULL || batches_init(&to_clients) < 0) {
        goto done;
    }
    while (pos < end) {
        if (end - pos < MESH_HEAD_LEN) {
            if ((error = PyUnicode_FromString("truncated packet record header")) == NULL) {
                goto done;
            }
            break;
        }
        Py_ssize_t length = be32((const unsigned char *)data + pos + 2 * KEY_LEN);
        const char *dst = data + pos, *src = data + pos + KEY_LEN, *packet = data + pos + MESH_HEAD_LEN;
        pos += MESH_HEAD_LEN;
        if (length > 65536 || end - pos < length) {
            if ((error = PyUnicode_FromFormat("packet record of %zd bytes overruns the batch", length)) == NULL) {
                goto done;
            }
            break;
        }
        pos += length;
        count++;
        PyObject *key = PyBytes_FromStringAndSize(dst, KEY_LEN);
        if (key == NULL) {
            goto done;
        }
        PyObject *client = PyDict_GetItemWithError(active, key); /* borrowed */
        Py_DECREF(key);
        if (client == NULL) {
            if (PyErr_Occurred()) {
                goto done;
            }
            dropped++;
            continue;
        }
        last = batches_index(&to_clients, client, last);
        if (last < 0 || records_add(&records, last, src, packet, length) < 0) {
            goto done;
        }
        to_clients.sizes[last] += HEADER_LEN + KEY_LEN + length;
        to_clients.counts[last] += 1;
        /* derper's sentTo: each (src, dst) run is noted once */
        if (last_src == NULL || memcmp(src, last_src, KEY_LEN) != 0 || memcmp(dst, last_dst, KEY_LEN) != 0) {
            PyObject *pair = Py_BuildValue("(y#y#)", src, (Py_ssize_t)KEY_LEN, dst, (Py_ssize_t)KEY_LEN);
            if (pair == NULL || PyList_Append(pairs, pair) < 0) {
                Py_XDECREF(pair);
                goto done;
            }
            Py_DECREF(pair);
            last_src = src;
            last_dst = dst;
        }
    }
    cursor = PyMem_Malloc((PyList_GET_SIZE(to_clients.objects) + 1) * sizeof(char *));
    if (cursor == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject *batches = batches_allocate(&to_clients, cursor);
    if (batches == NULL) {
        goto done;
    }
    for (Py_ssize_t k = 0; k < records.n; k++) {
        Record *r = &records.records[k];
        cursor[r->target] = write_recv_frame(cursor[r->target], r->src, r->start, r->length);
    }
    result = Py_BuildValue("(NnnOO)", batches, count, dropped, pairs, error == NULL ? Py_None : error);
done:
    Py_XDECREF(error);
    PyMem_Free(cursor);
    PyMem_Free(records.records);
    batches_free(&to_clients);
    Py_XDECREF(pairs);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef module_methods[] = {
    {"mesh_frames", (PyCFunction)(void (*)(void))mesh_frames, METH_FASTCALL,
     "mesh_frames(message, active) -> (to_clients, records, dropped, pairs, error): the RecvPacket "
     "frames of a mesh PACKETS message per local client, the (src, dst) runs, and the first "
     "malformation (None if none; the records before it are in the batches)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay_worker._fastpath",
    .m_doc = "The relay's per-packet loops in C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&RouterType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&fastpath_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&RouterType);
    if (PyModule_AddObject(module, "Router", (PyObject *)&RouterType) < 0) {
        Py_DECREF(&RouterType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
