#include <stdio.h>
int main(void) { fputs("tern: under construction\n", stderr); return 1; }
